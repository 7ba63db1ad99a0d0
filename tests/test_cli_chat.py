"""The command line on a chat model without BOS: quantize with the chat recipe, evaluate, diagnose, and the
errors the issue met (a group size that does not fit, a mistyped folder), each in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tiny_models import CHAT_TEMPLATE, IM_END, IM_START, build_config, build_tokenizer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from intactkv_modifier.cli.app import app
from intactkv_modifier.config import CONFIG_KEY
from intactkv_modifier.eval.corpus import CORPUS_PATH, PYTHON_DOCS

SYSTEM_TURN_IDS = [IM_START, 104, 114, 115, 116, IM_END]
needs_corpus = pytest.mark.skipif(
    not (CORPUS_PATH.exists() and PYTHON_DOCS.exists()),
    reason="--data chat builds conversations from the real-English corpus (scripts/main.sh installs it)",
)


def invoke(*args: str | Path) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "Traceback" not in result.output
    return errors[0]


@pytest.fixture(scope="module")
def chat_recipe(tmp_path_factory) -> Path:
    """The shipped chat recipe's modifiers at a group size the tiny model's 128-wide layers take."""
    path = tmp_path_factory.mktemp("recipe") / "chat.yaml"
    path.write_text(
        "quant_stage:\n  quant_modifiers:\n"
        "    GPTQModifier: {targets: [Linear], scheme: W4A16, ignore: [lm_head]}\n"
        "    IntactKVModifier: {prefix_chat_template: true}\n"
    )
    return path


@pytest.fixture(scope="module")
def quantized(tiny_chat_model_dir, chat_recipe, text_file, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("cli") / "chat-w4"
    result = invoke("quantize", tiny_chat_model_dir, "--recipe", chat_recipe, "--out", out, "--dataset", text_file,
                    "--num-samples", "4", "--seq-len", "32")
    return out, result


def test_quantize_starts_calibration_with_the_recipes_prefix_on_a_model_without_bos(quantized, monkeypatch):
    out, result = quantized
    assert result.exit_code == 0, result.output
    block = json.loads((out / "config.json").read_text())[CONFIG_KEY]
    assert block["prefix_token_ids"] == SYSTEM_TURN_IDS
    assert "<|im_start|> w100 w110 w111 w112 <|im_end|>" in " ".join(result.stdout.split())


def test_quantize_calibrates_on_windows_that_start_like_real_prompts(tiny_chat_model_dir, chat_recipe, text_file,
                                                                     tmp_path, monkeypatch):
    seen = {}

    def record(model_source, recipe, out, calibration, **kwargs):
        seen["windows"] = calibration
        raise RuntimeError("stop after the windows")

    monkeypatch.setattr("intactkv_modifier.export.quantize_to_checkpoint", record)
    invoke("quantize", tiny_chat_model_dir, "--recipe", chat_recipe, "--out", tmp_path / "x", "--dataset", text_file,
           "--num-samples", "3", "--seq-len", "24")
    assert seen["windows"].shape == (3, 24) and seen["windows"].dtype == torch.long
    assert all(row[: len(SYSTEM_TURN_IDS)].tolist() == SYSTEM_TURN_IDS for row in seen["windows"])


def test_eval_scores_text_windows_that_start_with_the_stored_system_turn(quantized, tiny_chat_model_dir, text_file):
    out, _ = quantized
    result = invoke("eval", out, "--reference", tiny_chat_model_dir, "--text-file", text_file, "--windows", "4",
                    "--seq-len", "32", "-q")
    assert result.exit_code == 0, result.output
    assert "quantized + IntactKV" in result.stdout


@needs_corpus
def test_eval_chat_reports_assistant_perplexity_and_agreement(quantized, tiny_chat_model_dir):
    out, _ = quantized
    result = invoke("eval", out, "--reference", tiny_chat_model_dir, "--data", "chat", "--conversations", "3",
                    "--multi-turn", "1", "--questions", "2", "-q")
    assert result.exit_code == 0, result.output
    pattern = r"│ (FP \(reference\)|quantized \(IntactKV off\)|quantized \+ IntactKV)\s*│" + r"\s*([\d.]*)\s*│" * 4
    rows = {match[0]: match[1:] for match in re.findall(pattern, result.stdout)}
    assert set(rows) == {"FP (reference)", "quantized (IntactKV off)", "quantized + IntactKV"}, result.stdout
    assert rows["FP (reference)"][2:] == ("", "")  # no KL of the reference to itself
    assert float(rows["quantized + IntactKV"][2]) >= 0 and 0 <= float(rows["quantized + IntactKV"][3]) <= 1
    assert "3 single-turn" in result.stdout and "answer tokens and its end-of-turn token only" in " ".join(
        result.stdout.split()
    )


@needs_corpus
def test_quantize_with_chat_data_calibrates_on_conversations(tiny_chat_model_dir, chat_recipe, tmp_path, monkeypatch):
    seen = {}

    def record(model_source, recipe, out, calibration, **kwargs):
        seen["windows"] = calibration
        raise RuntimeError("stop after the windows")

    monkeypatch.setattr("intactkv_modifier.export.quantize_to_checkpoint", record)
    invoke("quantize", tiny_chat_model_dir, "--recipe", chat_recipe, "--out", tmp_path / "x", "--data", "chat",
           "--num-samples", "2", "--seq-len", "48")
    tokenizer = build_tokenizer(adds_bos=False, chat_template=CHAT_TEMPLATE)
    first_user_turn = [IM_START, tokenizer.convert_tokens_to_ids("w101")]
    for row in seen["windows"]:
        assert row[: len(SYSTEM_TURN_IDS)].tolist() == SYSTEM_TURN_IDS
        assert row[len(SYSTEM_TURN_IDS) : len(SYSTEM_TURN_IDS) + 2].tolist() == first_user_turn


def test_diagnose_a_model_without_bos_starts_windows_with_the_system_turn(tiny_chat_model_dir, text_file, tmp_path,
                                                                         monkeypatch):
    from intactkv_modifier.eval import diagnosis

    measured = {}
    original = diagnosis.diagnose_pivot_tokens

    def record(model, windows, name):
        measured["windows"] = windows
        return original(model, windows, name)

    monkeypatch.setattr(diagnosis, "diagnose_pivot_tokens", record)
    result = invoke("diagnose", tiny_chat_model_dir, "--text-file", text_file, "--windows", "2", "--seq-len", "24",
                    "--out", tmp_path, "-q")
    assert result.exit_code == 0, result.output
    assert measured["windows"].dtype == torch.long
    assert all(row[: len(SYSTEM_TURN_IDS)].tolist() == SYSTEM_TURN_IDS for row in measured["windows"])


def test_the_verdict_for_a_chat_model_names_the_chat_recipe():
    """SmolLM2's measurements (DATA.md): sinks in most layers, token 0 far above the others."""
    from rich.console import Console

    from intactkv_modifier.cli.views import diagnosis_view
    from intactkv_modifier.eval.diagnosis import PivotDiagnosis

    measured = PivotDiagnosis(model="smollm2", windows=4, window_length=64,
                              attention_share_on_first_token_per_layer=[0.01, 0.5, 0.8],
                              attention_share_if_uniform=0.013, max_abs_hidden_by_position=[24900.0, 81.0, 80.0])
    console = Console(width=300, record=True)
    for item in diagnosis_view(measured, "<|im_start|>", list(range(21))):
        console.print(item)
    text = console.export_text()
    assert "Keep the whole 21-token prefix intact: `IntactKVModifier: {prefix_chat_template: true}`" in text
    assert "gptq-w3a16-g64-chat" in text


def test_a_group_size_that_does_not_fit_says_which_fit_in_one_line(tmp_path, text_file):
    folder = tmp_path / "w192"
    config = build_config("llama")
    config.hidden_size, config.intermediate_size, config.bos_token_id = 192, 384, None  # 192 = 3 x 64
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_tokenizer(adds_bos=False, chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    recipe = tmp_path / "g128.yaml"
    recipe.write_text(
        "quant_stage:\n  quant_modifiers:\n"
        "    GPTQModifier: {targets: [Linear], scheme: W3A16, ignore: [lm_head]}\n"
        "    IntactKVModifier: {prefix_chat_template: true}\n"
    )
    line = one_error_line(invoke("quantize", folder, "--recipe", recipe, "--out", tmp_path / "out",
                                 "--dataset", text_file, "--num-samples", "2", "--seq-len", "24"))
    assert "groups of 128, which does not divide the input width 192 of 10 of the 14 layers" in line
    assert "group sizes that fit every layer: 64, 32" in line and "gptq-w3a16-g64-chat" in line
    assert len(line) < 400
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["quantize", "diagnose", "eval"])
def test_a_mistyped_folder_is_named_as_missing(command, tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    extra = ["--recipe", "gptq-w4a16", "--out", str(tmp_path / "out")] if command == "quantize" else []
    line = one_error_line(invoke(command, missing, *extra))
    assert line == f"error: no such folder: {missing}"


def test_a_recipe_without_intactkv_is_refused_before_loading(tiny_chat_model_dir, tmp_path):
    recipe = tmp_path / "plain.yaml"
    recipe.write_text("quant_stage:\n  quant_modifiers:\n    GPTQModifier: {targets: [Linear], scheme: W4A16}\n")
    line = one_error_line(invoke("quantize", tiny_chat_model_dir, "--recipe", recipe, "--out", tmp_path / "o"))
    assert "has no IntactKVModifier" in line


@needs_corpus
def test_eval_chat_with_another_system_prompt_than_the_stored_one_is_refused(quantized):
    """Conversations under another system prompt would not start with the stored prefix: IntactKV would not apply."""
    out, _ = quantized
    line = one_error_line(invoke("eval", out, "--data", "chat", "--system-prompt", "w7 w8", "--conversations", "2",
                                 "--multi-turn", "0", "--questions", "0"))
    assert f"not with the intact prefix {SYSTEM_TURN_IDS}" in line and "give the same system prompt" in line
