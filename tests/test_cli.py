"""The ``intactkv`` command on tiny models: each command's result, its exit status, and what it keeps quiet."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from tiny_models import load
from tolerances import two_perplexities, within
from transformers import AutoTokenizer
from typer.testing import CliRunner

from intactkv_modifier import intact_kv_disabled
from intactkv_modifier.checkpoint import SIDE_FILE_PATH
from intactkv_modifier.cli.app import app
from intactkv_modifier.cli.output import perplexity_with_progress
from intactkv_modifier.cli.views import diagnosis_view
from intactkv_modifier.config import CONFIG_KEY, FORMAT_VERSION
from intactkv_modifier.eval.diagnosis import PivotDiagnosis
from intactkv_modifier.eval.perplexity import perplexity, token_windows
from intactkv_modifier.recipes import resolve_recipe, shipped_recipes

SEQ_LEN = 32  # the tiny models' context is 64 positions


def invoke(*args: str | Path) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def quantized(tiny_model_dirs, text_file, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("cli") / "llama-w4a16"
    result = invoke("quantize", tiny_model_dirs["llama"], "--recipe", "gptq-w4a16", "--out", out,
                    "--dataset", text_file, "--num-samples", "4", "--seq-len", str(SEQ_LEN))
    return out, result


def test_shipped_recipes_are_package_data_found_by_short_name(tmp_path):
    names = shipped_recipes()
    assert {"gptq-w4a16", "gptq-w3a16", "gptq-w4a16-k4v2", "awq-w4a16", "spinquant-gptq-w4a16"} <= set(names)
    assert resolve_recipe("gptq-w3a16").name == "gptq_w3a16_intactkv.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("quant_stage: {}\n")
    assert resolve_recipe(str(own)) == own
    with pytest.raises(FileNotFoundError, match="gptq-w4a16"):
        resolve_recipe("gptq-w5")
    listed = invoke("recipes")
    assert listed.exit_code == 0 and all(name in listed.stdout for name in names)


def test_quantize_saves_the_checkpoint_and_summarises_it_quietly(quantized):
    out, result = quantized
    assert result.exit_code == 0, result.output
    assert (out / SIDE_FILE_PATH).is_file() and (out / "tokenizer.json").is_file()
    assert "'<s>' (ids [1])" in result.stdout
    errors = re.search(r"keys (\d+\.\d+)%, values (\d+\.\d+)%", result.stdout)
    assert errors and float(errors.group(2)) > 0  # W4 rounding moves the quantized model's own prefix values
    assert "not calibrated" in result.stdout and "side file" in result.stdout
    assert "METRIC" not in result.output and "No accelerator" not in result.output


def test_verbose_gives_the_library_logs_back(tiny_model_dirs, text_file, tmp_path):
    result = invoke("quantize", tiny_model_dirs["llama"], "--recipe", "gptq-w4a16", "--out", tmp_path / "ckpt",
                    "--dataset", text_file, "--num-samples", "1", "--seq-len", "16", "-v")
    assert result.exit_code == 0, result.output
    assert "METRIC" in result.output and "IntactKV: captured" in result.output


@pytest.mark.numerics
def test_eval_scores_the_reloaded_checkpoint_off_and_on(quantized, tiny_model_dirs, text_file):
    out, _ = quantized
    result = invoke("eval", out, "--reference", tiny_model_dirs["llama"], "--text-file", text_file,
                    "--windows", "3", "--seq-len", str(SEQ_LEN), "--batch-size", "2", "-q")
    assert result.exit_code == 0, result.output
    rows = dict(re.findall(r"│ (FP \(reference\)|quantized \(IntactKV off\)|quantized \+ IntactKV)\s*│\s*([\d.]+)",
                           result.stdout))
    windows = token_windows(AutoTokenizer.from_pretrained(out), text_file.read_text(), [1], SEQ_LEN, 3)
    model = load(out)
    assert _matches_the_table(float(rows["quantized + IntactKV"]), model, windows)
    with intact_kv_disabled(model):
        assert _matches_the_table(float(rows["quantized (IntactKV off)"]), model, windows)
    assert _matches_the_table(float(rows["FP (reference)"]), load(tiny_model_dirs["llama"]), windows)


@torch.no_grad()
def _matches_the_table(shown: float, model: torch.nn.Module, windows: torch.Tensor) -> bool:
    """Within half the table's last decimal (3 are shown) plus how far its batches of 2 move the perplexity."""
    expected = perplexity(model, windows)
    largest_logit = float(model(input_ids=windows).logits.abs().max())
    return within(abs(shown - expected), 5e-4 + expected * two_perplexities(model.config, SEQ_LEN, largest_logit))


@pytest.mark.numerics
def test_perplexity_by_batches_equals_the_whole(tiny_model_dirs, text_file):
    """The progress bar's batch-by-batch perplexity, uneven last batch included, is the same number."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    windows = token_windows(tokenizer, text_file.read_text(), [1], 16, 5)
    model = load(tiny_model_dirs["llama"])
    by_batches = perplexity_with_progress(model, windows, "test", batch_size=2)
    with torch.no_grad():
        largest_logit = float(model(input_ids=windows).logits.abs().max())
    # batches of 2 against one of 5: the same sums in other matmul shapes
    assert within(abs(by_batches / perplexity(model, windows) - 1), two_perplexities(model.config, 16, largest_logit))


def test_inspect_passes_a_good_checkpoint(quantized):
    out, _ = quantized
    result = invoke("inspect", out)
    assert result.exit_code == 0, result.output
    assert '"prefix_token_ids"' in result.stdout and "[2, 1, 32] float32" in result.stdout
    assert "README.md says that the prefix needs intactkv-modifier" in result.stdout
    verdict = " ".join(result.stdout[result.stdout.index("Verdict:") :].split())
    assert verdict.startswith("Verdict: loads with its intact prefix in transformers and vLLM where intactkv-modifier "
                              "is installed (without it, both load the plain quantized model, silently)")


def _drop_side_file(ckpt: Path) -> None:
    (ckpt / SIDE_FILE_PATH).unlink()


def _edit_block(**changes: object):
    def edit(ckpt: Path) -> None:
        config = json.loads((ckpt / "config.json").read_text())
        config[CONFIG_KEY].update(changes)
        (ckpt / "config.json").write_text(json.dumps(config))

    return edit


def _poison_a_value(ckpt: Path) -> None:
    tensors = load_file(ckpt / SIDE_FILE_PATH)
    tensors["layers.1.self_attn.intact_value"][0, 0, 0] = float("nan")
    save_file(tensors, ckpt / SIDE_FILE_PATH)


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        (_drop_side_file, "intactkv/ folder"),
        (_edit_block(num_layers=3), "(layers, kv heads, head dim)"),
        (_edit_block(format_version=FORMAT_VERSION + 1), f"format_version {FORMAT_VERSION + 1}"),
        (_poison_a_value, "not the one saved with this config"),  # the block's sha256 no longer matches
    ],
    ids=["no-side-file", "wrong-geometry", "future-format", "rewritten-side-file"],
)
def test_inspect_fails_exactly_the_checkpoints_the_loader_refuses(quantized, tmp_path, breakage, reason):
    broken = tmp_path / "broken"
    shutil.copytree(quantized[0], broken)
    breakage(broken)
    result = invoke("inspect", broken, "-q")
    assert result.exit_code == 1
    assert "WILL NOT LOAD" in result.stdout and reason in " ".join(result.stdout.split())
    with pytest.raises(ValueError):
        load(broken)


def test_diagnose_measures_and_writes_the_figure(tiny_model_dirs, text_file, tmp_path):
    """Random weights spread attention evenly (RMSNorm hides the scaled BOS embedding): no pivot token."""
    result = invoke("diagnose", tiny_model_dirs["llama"], "--text-file", text_file, "--windows", "2",
                    "--seq-len", str(SEQ_LEN), "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "Pivot tokens: no clear sign" in result.stdout
    measured = json.loads((tmp_path / "pivot_diagnosis.json").read_text())
    assert len(measured["attention_share_on_first_token_per_layer"]) == 2 and not measured["has_pivot_tokens"]
    assert (tmp_path / "pivot_diagnosis.png").stat().st_size > 0


def test_diagnosis_verdict_names_the_prefix_to_keep():
    """pivot-llama's measurements (README): sinks in layers 0 and 5, token 0 six times the others."""
    diagnosis = PivotDiagnosis(
        model="pivot-llama", windows=16, window_length=256,
        attention_share_on_first_token_per_layer=[0.269, 0.032, 0.059, 0.014, 0.041, 0.198],
        attention_share_if_uniform=0.016, max_abs_hidden_by_position=[174.5, 56.8, 28.6, 28.6, 20.0],
    )
    assert diagnosis.sink_layers == [0, 5] and diagnosis.has_pivot_tokens
    console = Console(width=200, record=True)
    for item in diagnosis_view(diagnosis, "<s>", [1]):
        console.print(item)
    text = console.export_text()
    assert "Pivot tokens: yes (attention sink in layer(s) 0, 5; token 0's activation peak is 6.1×" in text
    assert "Keep '<s>' (id 1) intact" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["quantize", "MODEL", "--recipe", "gptq-w5", "--out", "OUT"], "error: no recipe 'gptq-w5'"),
        (["eval", "MODEL", "--text-file", "TEXT"], "has no `intactkv_config`"),
        (["eval", "CKPT", "--text-file", "TEXT", "--windows", "500", "--seq-len", "32"], "give a longer text"),
        (["inspect", "MODEL", "-v", "-q"], "exclude each other"),
    ],
    ids=["unknown-recipe", "not-intactkv", "text-too-short", "verbose-and-quiet"],
)
def test_errors_are_one_line_and_a_failing_exit_status(quantized, tiny_model_dirs, text_file, args, message):
    paths = {"MODEL": tiny_model_dirs["llama"], "CKPT": quantized[0], "TEXT": text_file, "OUT": "unused"}
    result = invoke(*[paths.get(a, a) for a in args])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    if "exclude" not in message:
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.output


def test_importing_the_package_prints_nothing_and_keeps_llmcompressor_logging():
    """llm-compressor warns "No accelerator available!" while it is imported on a CPU; the package hides only that."""
    code = (
        "import os, subprocess, intactkv_modifier\n"
        "from llmcompressor.utils.dev import get_main_device\n"
        "print('RESULT', os.environ.get('LLM_COMPRESSOR_LOG_LEVEL'), flush=True)\n"
        "get_main_device()\n"  # after the import, llm-compressor's own logging is back
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    before, marker, after = result.stdout.partition("RESULT None\n")  # None: the environment is restored
    assert marker and "No accelerator" not in before + result.stderr
    if not torch.accelerator.is_available():
        assert "No accelerator available" in after
