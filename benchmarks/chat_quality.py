"""Chat quality: a chat model's system prompt as the intact prefix, measured the way chat models are used.

For each recipe the model is quantized once, with ``IntactKVModifier(prefix_chat_template=True)``
(the whole system turn of the chat template, SmolLM2: 21 tokens); every column is that
same quantized model with another prefix KV spliced in:

* quantized: no intact prefix (``intact_kv_disabled``);
* +IntactKV, first token: only the first token's FP KV (``<|im_start|>``), the [BOS]-like
  setting; exactly the first position of the captured system-prompt KV (causal attention);
* +IntactKV, system prompt: the FP KV of the whole system turn, as captured;
* +IntactKV+Cal: that KV fitted on the calibration conversations (the modifier's own
  ``calibration:`` option; none where activations are fake-quantized, which pass no gradient).

The ablation of the paper (one token against the whole system prompt) is the middle two
columns. Every column is scored on the same held-out set (:mod:`intactkv_modifier.eval.chat_eval`):
perplexity of the assistant turns of single-turn and multi-turn conversations built from the
corpus's held-out split, and KL divergence / top-1 agreement to the FP model along the FP
model's own greedy answers to held-out questions. Calibration (GPTQ/AWQ statistics and +Cal)
uses multi-turn conversations of the calibration split cut to ``--length`` tokens.

    python benchmarks/chat_quality.py --model outputs/smollm2-135m-instruct --out benchmarks/results/cpu/smollm2

Writes ``chat_quality.json`` (after every recipe) and ``chat_quality.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.modifiers.transform import AWQModifier, SpinQuantModifier
from loguru import logger
from quality import gptq, load_model, previous_rows, rtn
from transformers import AutoTokenizer

from intactkv_modifier import IntactKVModifier, attach_intact_kv, intact_kv_disabled
from intactkv_modifier.calibration import CalibrationSettings
from intactkv_modifier.chat_template import chat_system_part
from intactkv_modifier.eval.chat_eval import ChatEvalSet, ChatEvalSizes, build_chat_eval_set, score_chat
from intactkv_modifier.eval.chat_samples import chat_windows
from intactkv_modifier.eval.conversations import sample_question_answers
from intactkv_modifier.eval.report import gap_closed

GROUP = 64  # SmolLM2's 576-wide layers take groups of 64 or 32, not 128


def weights_and_activations(bits: int, activation_bits: int) -> dict[str, QuantizationScheme]:
    """Weights in groups of ``GROUP``, inputs of every Linear quantized per token at run time (QuaRot's A-bits)."""
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=GROUP)
    inputs = QuantizationArgs(num_bits=activation_bits, type="int", symmetric=True, strategy="token", dynamic=True)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)}


def rotated_w4a4() -> list[Modifier]:
    """QuaRot's setting as llm-compressor runs it: Hadamard rotations of the residual stream (R1), the values
    (R2) and the down projection's input (R4, online), then GPTQ W4 with 4-bit per-token activations.
    random-hadamard: SmolLM2's 576 is no power of two."""
    return [
        SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="random-hadamard"),
        GPTQModifier(config_groups=weights_and_activations(4, 4), ignore=["lm_head"]),
    ]


RECIPES: dict[str, Callable[[], list[Modifier]]] = {
    "RTN W4 g64": lambda: [rtn(4, GROUP)],
    "RTN W3 g64": lambda: [rtn(3, GROUP)],
    "GPTQ W4 g64": lambda: [gptq(4, GROUP)],
    "GPTQ W3 g64": lambda: [gptq(3, GROUP)],
    "AWQ W4 g64": lambda: [AWQModifier(offload_device=None), rtn(4, GROUP)],
    "AWQ W3 g64": lambda: [AWQModifier(offload_device=None), rtn(3, GROUP)],
    "SpinQuant R1R2R4 + GPTQ W4A4 g64": rotated_w4a4,
}
#: fake-quantized activations pass no gradient back to the prefix K/V: no +Cal column
NO_CALIBRATION = {"SpinQuant R1R2R4 + GPTQ W4A4 g64"}
COLUMNS = ("quantized", "intactkv_first_token", "intactkv_system_prompt", "intactkv_cal")


def run_recipe(args: argparse.Namespace, name: str, context: dict) -> dict:
    model = load_model(args.model, torch.float32, args.device)
    calibration = (
        CalibrationSettings(num_samples=context["calibration"].shape[0], epochs=args.cal_epochs, lr=args.cal_lr,
                            batch_size=args.cal_batch_size, seed=args.seed)
        if args.cal_epochs and name not in NO_CALIBRATION else None
    )
    intactkv = IntactKVModifier(prefix_chat_template=True, calibration=calibration)
    windows = context["calibration"]
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    oneshot(
        model=model, processor=context["tokenizer"],
        dataset=Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}),
        recipe=[*RECIPES[name](), intactkv], num_calibration_samples=windows.shape[0], max_seq_length=windows.shape[1],
    )
    seconds = time.perf_counter() - started - (intactkv.calibration_seconds or 0.0)
    prefix = intactkv.resolved_prefix_token_ids
    if prefix != context["prefix"]:
        raise RuntimeError(f"the modifier stored {prefix}, the evaluation set starts with {context['prefix']}")
    captured = intactkv.captured_prefix_kv
    row: dict = {"recipe": name, "quantize_seconds": round(seconds, 1)}

    def score(column: str) -> None:
        logger.info(f"chat quality: {name}, {column}")
        row[column] = score_chat(model, context["eval_set"], context["fp_model"], args.batch_size).to_json()

    if calibration is not None:
        row["calibration_seconds"] = round(intactkv.calibration_seconds, 1)
        score("intactkv_cal")  # the modifier left the fitted KV attached
    attach_intact_kv(model, prefix, captured)
    score("intactkv_system_prompt")
    attach_intact_kv(model, prefix[:1], captured.truncated(1))
    score("intactkv_first_token")
    with intact_kv_disabled(model):
        score("quantized")
    return row


def measured_or_failed(args: argparse.Namespace, name: str, context: dict) -> dict:
    """The recipe's row, or its error: one recipe that does not run here (llm-compressor 0.14's AWQ pins memory,
    which needs CUDA) is reported as not run, with the reason, and the table goes on with the others."""
    try:
        return run_recipe(args, name, context)
    except Exception as error:  # noqa: BLE001 - any failure of one recipe is that row's result
        logger.error(f"chat quality: {name} failed: {type(error).__name__}: {error}")
        return {"recipe": name, "error": f"{type(error).__name__}: {error}"}


def model_label(folder: str) -> str:
    """The prepared model's name (``intactkv prepare`` records it) and the folder, else the folder."""
    provenance = Path(folder) / "intactkv_prepared.json"
    return f"{json.loads(provenance.read_text())['model']} ({folder})" if provenance.is_file() else folder


def markdown(result: dict) -> str:
    fp = result["fp"]
    sizes = result["eval_set"]
    lines = [
        f"Model `{result['model']}` (float32; {result['fp_note']}), {result['device_name']}, seed {result['seed']}. "
        f"Intact prefix: the whole system turn, {len(result['prefix_token_ids'])} tokens; first token "
        f"`{result['first_token']}`. Calibration: {result['calibration_windows']} multi-turn conversations of "
        f"{result['window_length']} tokens (calibration split); +Cal {result['calibration']['epochs']} epochs, "
        f"lr {result['calibration']['lr']}, batch {result['calibration']['batch_size']}.",
        "",
        f"Held-out split: {sizes['single_turn_samples']} single-turn conversations "
        f"({sizes['single_turn_scored_tokens']} scored tokens), {sizes['multi_turn_samples']} conversations of "
        f"{result['sizes']['turns']} turns ({sizes['multi_turn_scored_tokens']} scored tokens), "
        f"{sizes['greedy_samples']} questions answered greedily by the FP model ({sizes['greedy_scored_tokens']} "
        "positions). Perplexity counts the assistant's answer tokens and its end-of-turn token only; KL and top-1 "
        "count the positions that predict the FP model's answer tokens and its end-of-turn token.",
        "",
    ]
    for metric, title, digits in (
        ("single_turn_ppl", "Assistant-turn perplexity, single-turn conversations", 3),
        ("multi_turn_ppl", "Assistant-turn perplexity, multi-turn conversations (system turn first)", 3),
        ("kl_to_fp", "KL(FP ‖ quantized) in nats per position, along the FP model's greedy answers", 4),
        ("top1_agreement", "Top-1 agreement with the FP model along its greedy answers", 4),
    ):
        lines += _metric_table(result, metric, title, digits, fp.get(metric))
    failed = [row for row in result["rows"] if "error" in row]
    if failed:
        lines += ["**Not run here**", "", *(f"- {row['recipe']}: `{row['error']}`" for row in failed), ""]
    return "\n".join(lines) + "\n"


def _metric_table(result: dict, metric: str, title: str, digits: int, fp: float | None) -> list[str]:
    gap_metric = metric.endswith("ppl")
    lines = [
        f"**{title}**" + (f" (FP: {fp:.{digits}f})" if fp is not None else ""),
        "",
        "| recipe | quantized | +IntactKV, first token | +IntactKV, system prompt | +IntactKV+Cal |"
        + (" gap closed (first token / system prompt / +Cal) |" if gap_metric else ""),
        "|---|---|---|---|---|" + ("---|" if gap_metric else ""),
    ]
    for row in (row for row in result["rows"] if "error" not in row):
        values = [row.get(column, {}).get(metric) for column in COLUMNS]
        cells = " | ".join("n/a" if v is None else f"{v:.{digits}f}" for v in values)
        if gap_metric:
            closed = [None if v is None else gap_closed(fp, values[0], v) for v in values[1:]]
            cells += " | " + " / ".join("n/a" if c is None else f"{c:.1%}" for c in closed)
        lines.append(f"| {row['recipe']} | {cells} |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/smollm2-135m-instruct")
    parser.add_argument("--recipes", nargs="+", default=None, help=f"subset of {list(RECIPES)}")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--length", type=int, default=256, help="tokens per calibration conversation")
    parser.add_argument("--single-turn", type=int, default=64)
    parser.add_argument("--multi-turn", type=int, default=16)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--greedy", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cal-epochs", type=int, default=20, help="0 skips the +Cal column")
    parser.add_argument("--cal-lr", type=float, default=2e-4)
    parser.add_argument("--cal-batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/smollm2-135m-instruct"))
    parser.add_argument("--append", action="store_true", help="keep other recipes' rows of --out/chat_quality.json")
    parser.add_argument(
        "--samples-file", type=Path, default=None,
        help="read the calibration windows and the held-out samples (FP greedy answers included) from this file, "
        "written by --save-samples: the same tokens on a machine without the corpus",
    )
    parser.add_argument("--save-samples", type=Path, default=None, help="write the samples to this file and stop")
    args = parser.parse_args()
    names = args.recipes or [n for n in RECIPES if args.device.startswith("cuda") or not n.startswith("AWQ")]
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    _, prefix = chat_system_part(tokenizer)
    sizes = ChatEvalSizes(single_turn=args.single_turn, multi_turn=args.multi_turn, turns=args.turns,
                          greedy=args.greedy, max_new_tokens=args.max_new_tokens)
    fp_model = load_model(args.model, torch.float32, args.device)
    if args.samples_file is not None:
        saved = torch.load(args.samples_file)
        calibration, eval_set = saved["calibration"], ChatEvalSet.from_tensors(saved["eval_set"])
    else:
        pairs = sample_question_answers("calibration", 8 * args.calibration_windows, args.seed)
        calibration = chat_windows(tokenizer, pairs, None, args.length, args.calibration_windows)
        eval_set = build_chat_eval_set(tokenizer, prefix, fp_model, sizes=sizes, seed=args.seed,
                                       batch_size=args.batch_size)
    if args.save_samples is not None:
        torch.save({"calibration": calibration, "eval_set": eval_set.to_tensors()}, args.save_samples)
        return
    context = {"tokenizer": tokenizer, "prefix": prefix, "calibration": calibration, "eval_set": eval_set,
               "fp_model": fp_model}
    out_json = args.out / "chat_quality.json"
    result = {
        "model": model_label(args.model),
        "fp_note": "the FP reference is the dequantized Q4_1 GGUF weights",
        "prefix_token_ids": prefix,
        "first_token": tokenizer.convert_ids_to_tokens(prefix[:1])[0],
        "calibration_windows": calibration.shape[0],
        "window_length": calibration.shape[1],
        "samples": str(args.samples_file) if args.samples_file else "built from the corpus on this machine",
        "seed": args.seed,
        "sizes": sizes.model_dump(),
        "eval_set": eval_set.describe(),
        "calibration": {"epochs": args.cal_epochs, "lr": args.cal_lr, "batch_size": args.cal_batch_size},
        "device_name": (
            torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
        ),
        "machine": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "fp": score_chat(fp_model, eval_set, None, args.batch_size).to_json(),
        "rows": previous_rows(out_json, exclude=names) if args.append else [],
    }
    for name in names:
        logger.info(f"chat quality: {name}")
        result["rows"].append(measured_or_failed(args, name, context))
        result["rows"].sort(key=lambda row: list(RECIPES).index(row["recipe"]))
        args.out.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "chat_quality.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
