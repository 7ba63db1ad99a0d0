"""Quality benchmark: perplexity of FP and quantized models, without and with IntactKV (+Cal).

Every row uses the same calibration windows, the same held-out evaluation
windows and the same seed. For each recipe the model is quantized once, with
IntactKVModifier in the recipe; "quantized" is that same model with the intact
prefix switched off (``intact_kv_disabled``), so each pair differs only in the
prefix KV. "+Cal" is the modifier's own calibration option: it fits the prefix
K/V on the calibration windows against the FP model's final hidden states,
recorded when the prefix is captured (after rotations, before quantization);
the "+IntactKV" row puts back the uncalibrated capture.

Each model is also scored through lm-eval's harness on a multiple-choice task
made from the held-out text (:mod:`intactkv_modifier.eval.continuation_choice`:
no lm-eval task's data can be downloaded here); ``pip install -e ".[lm-eval]"``,
or ``--mc-questions 0`` to skip it.

    python benchmarks/quality.py --model models/pivot-llama --out benchmarks/results

Writes ``quality.json`` and ``quality.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.transform import AWQModifier, SpinQuantModifier
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer

from intactkv_modifier import IntactKVModifier, attach_intact_kv, intact_kv_disabled
from intactkv_modifier.calibration import CalibrationSettings, calibrate_prefix_kv, record_targets
from intactkv_modifier.eval.continuation_choice import continuation_questions, write_lm_eval_task
from intactkv_modifier.eval.corpus import load_corpus_text
from intactkv_modifier.eval.perplexity import perplexity, saved_windows, token_windows
from intactkv_modifier.eval.report import gap_closed
from intactkv_modifier.prefix import measured_prefix


def weight_only(bits: int, group_size: int = 128) -> dict[str, QuantizationScheme]:
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def gptq(bits: int, group_size: int = 128) -> GPTQModifier:
    return GPTQModifier(config_groups=weight_only(bits, group_size), ignore=["lm_head"])


def rtn(bits: int, group_size: int = 128) -> QuantizationModifier:
    return QuantizationModifier(config_groups=weight_only(bits, group_size), ignore=["lm_head"])


# fake-quantized activations pass no gradient back to the prefix K/V: these rows have no +Cal column
NO_CALIBRATION = {"GPTQ W8A8 int8"}

RECIPES: dict[str, Callable[[], list[Modifier]]] = {
    "RTN W4 g128": lambda: [rtn(4)],
    "RTN W3 g128": lambda: [rtn(3)],
    "GPTQ W4 g128": lambda: [gptq(4)],
    "GPTQ W3 g128": lambda: [gptq(3)],
    "AWQ W3 g128": lambda: [AWQModifier(offload_device=None), rtn(3)],
    # int8 weights per channel, int8 activations per token (dynamic): the pivot token's outliers meet 8 bits
    "GPTQ W8A8 int8": lambda: [GPTQModifier(scheme="W8A8", targets="Linear", ignore=["lm_head"])],
    # random-hadamard: a deterministic Hadamard needs a power-of-two hidden size (pivot-llama has 384)
    "SpinQuant R1R2 + GPTQ W3 g128": lambda: [
        SpinQuantModifier(rotations=["R1", "R2"], transform_type="random-hadamard"),
        gptq(3),
    ],
}


def load_model(model_dir: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()


def multiple_choice_accuracy(model: torch.nn.Module, tokenizer, args: argparse.Namespace) -> dict[str, float] | None:
    """lm-eval's accuracy on the held-out continuation task written to ``args.mc_task_dir``; None when skipped."""
    if not args.mc_questions:
        return None
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # add_bos_token: every request starts with [BOS], the prefix IntactKV replaces
    lm = HFLM(
        pretrained=model, tokenizer=tokenizer, add_bos_token=True, batch_size=4 * args.batch_size,
        max_length=args.length,
    )
    task = args.mc_task_name
    output = simple_evaluate(
        model=lm, tasks=[task], task_manager=TaskManager(include_path=str(args.mc_task_dir)), random_seed=args.seed,
        numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed,
    )
    scores = output["results"][task]
    return {metric: scores[f"{metric},none"] for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}


def run_recipe(
    args: argparse.Namespace, name: str, calib: torch.Tensor, evaluation: torch.Tensor, prefix: list[int]
) -> dict:
    model = load_model(args.model, args.dtype, args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = (
        CalibrationSettings(
            num_samples=calib.shape[0], epochs=args.cal_epochs, lr=args.cal_lr, batch_size=args.cal_batch_size,
            seed=args.seed,
        )
        if args.cal_epochs and name not in NO_CALIBRATION
        else None
    )
    intactkv = IntactKVModifier(prefix_token_ids=prefix, calibration=calibration)
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=[*RECIPES[name](), intactkv],
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
    )
    seconds = time.perf_counter() - started
    row: dict = {"recipe": name, "quantize_seconds": round(seconds - (intactkv.calibration_seconds or 0.0), 1)}
    if calibration is not None:
        row["calibration_seconds"] = round(intactkv.calibration_seconds, 1)
        if args.device.startswith("cuda"):
            row["oneshot_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["ppl_intactkv_cal"] = perplexity(model, evaluation, args.batch_size, f"{name}: +IntactKV+Cal")
        row["mc_intactkv_cal"] = multiple_choice_accuracy(model, tokenizer, args)
        attach_intact_kv(model, prefix, intactkv.captured_prefix_kv)  # back to the uncalibrated capture
        if args.cal_reference:
            row.update(reference_calibration(args, model, calib, evaluation, prefix, name))
            attach_intact_kv(model, prefix, intactkv.captured_prefix_kv)
    with intact_kv_disabled(model):
        row["ppl_quantized"] = perplexity(model, evaluation, args.batch_size, f"{name}: quantized")
        row["mc_quantized"] = multiple_choice_accuracy(model, tokenizer, args)
    row["ppl_intactkv"] = perplexity(model, evaluation, args.batch_size, f"{name}: +IntactKV")
    row["mc_intactkv"] = multiple_choice_accuracy(model, tokenizer, args)
    return row


def reference_calibration(
    args: argparse.Namespace, model: torch.nn.Module, calib: torch.Tensor, evaluation: torch.Tensor,
    prefix: list[int], name: str,
) -> dict:
    """+Cal with the reference implementation's loss and schedule, from the same captured prefix KV.

    Its every-layer targets come from a fresh FP model: for recipes without a rotation (RTN, GPTQ,
    AWQ, whose smoothing leaves every layer's output unchanged) that is the deployed basis.
    """
    # the reference's 16 samples per optimizer step, as micro-batches of --cal-batch-size: the same gradient
    settings = CalibrationSettings.reference(
        num_samples=calib.shape[0], epochs=args.cal_epochs, seed=args.seed, batch_size=args.cal_batch_size,
        gradient_accumulation=max(1, 16 // args.cal_batch_size),
    )
    fp_model = load_model(args.model, args.dtype, args.device)
    targets = record_targets(fp_model, [{"input_ids": calib}], prefix, calib.shape[0], settings.loss)
    del fp_model
    started = time.perf_counter()
    attach_intact_kv(model, prefix, calibrate_prefix_kv(model, targets, settings))
    seconds = time.perf_counter() - started
    return {
        "calibration_reference_seconds": round(seconds, 1),
        "ppl_intactkv_cal_reference": perplexity(model, evaluation, args.batch_size, f"{name}: +Cal (reference)"),
    }


def markdown(result: dict) -> str:
    fp = result["ppl_fp"]
    with_reference = any("ppl_intactkv_cal_reference" in row for row in result["rows"])
    lines = [
        f"Model `{result['model']}`, {result['eval_windows']} held-out windows of {result['window_length']} tokens, "
        f"{result['calibration_windows']} calibration windows, seed {result['seed']}, {result['device_name']}.",
        "",
        "| recipe | quantized | +IntactKV | +IntactKV+Cal | FP→quantized gap closed (IntactKV / +Cal) |"
        + (" +Cal (reference loss and schedule) | gap closed |" if with_reference else ""),
        "|---|---|---|---|---|" + ("---|---|" if with_reference else ""),
        f"| FP ({result['dtype']}) | {fp:.3f} | | | |" + (" | |" if with_reference else ""),
    ]
    for row in result["rows"]:
        cal = row.get("ppl_intactkv_cal")
        closed = gap_closed(fp, row["ppl_quantized"], row["ppl_intactkv"])
        closed_cal = gap_closed(fp, row["ppl_quantized"], cal) if cal is not None else None
        fmt = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
        reference = row.get("ppl_intactkv_cal_reference")
        reference_cells = (
            "" if not with_reference else " | |" if reference is None
            else f" {reference:.3f} | {fmt(gap_closed(fp, row['ppl_quantized'], reference))} |"
        )
        lines.append(
            f"| {row['recipe']} | {row['ppl_quantized']:.3f} | {row['ppl_intactkv']:.3f} | "
            f"{'' if cal is None else f'{cal:.3f}'} | {fmt(closed)} / {fmt(closed_cal)} |" + reference_cells
        )
    if result.get("mc_fp"):
        lines += multiple_choice_table(result)
    return "\n".join(lines) + "\n"


def multiple_choice_table(result: dict) -> list[str]:
    def cell(scores: dict | None) -> str:
        return "" if not scores else f"{scores['acc']:.3f} ± {scores['acc_stderr']:.3f} / {scores['acc_norm']:.3f}"

    lines = [
        "",
        f"lm-eval `{result['mc_task']}`: {result['mc_questions']} four-way questions from the held-out text (context "
        "16 words, answer the next 6, wrong answers from other paragraphs); acc ± standard error / acc_norm.",
        "",
        "| recipe | quantized | +IntactKV | +IntactKV+Cal |",
        "|---|---|---|---|",
        f"| FP ({result['dtype']}) | {cell(result['mc_fp'])} | | |",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['recipe']} | {cell(row.get('mc_quantized'))} | {cell(row.get('mc_intactkv'))} | "
            f"{cell(row.get('mc_intactkv_cal'))} |"
        )
    return lines


def previous_rows(path: Path, exclude: list[str]) -> list[dict]:
    """Rows of an earlier run of the same benchmark, minus the recipes about to be measured again."""
    if not path.exists():
        return []
    return [row for row in json.loads(path.read_text())["rows"] if row["recipe"] not in exclude]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/pivot-llama")
    parser.add_argument("--recipes", nargs="+", default=None, help=f"subset of {list(RECIPES)}")
    parser.add_argument("--calibration-windows", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cal-epochs", type=int, default=20, help="0 skips the +Cal rows")
    parser.add_argument("--cal-lr", type=float, default=2e-4)
    parser.add_argument("--cal-batch-size", type=int, default=1, help="samples per optimizer step (paper: 1)")
    parser.add_argument(
        "--cal-reference", action="store_true",
        help="also fit the prefix with the reference implementation's loss and schedule (extra column)",
    )
    parser.add_argument(
        "--windows-file", type=Path, default=None,
        help="read the calibration and evaluation windows from this file (written by --save-windows) instead of "
        "cutting them from the corpus: the same tokens on a machine without the corpus",
    )
    parser.add_argument("--save-windows", type=Path, default=None, help="write the windows to this file and stop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--mc-questions", type=int, default=1500, help="questions of the lm-eval multiple-choice task; 0 skips it"
    )
    parser.add_argument(
        "--append", action="store_true",
        help="keep the rows of other recipes already in --out/quality.json (split a long run over several calls)",
    )
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    names = args.recipes or [n for n in RECIPES if args.device.startswith("cuda") or not n.startswith("AWQ")]
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prefix = measured_prefix(tokenizer)[0]  # [BOS], or a chat model's system turn
    if args.windows_file is not None:
        calib = saved_windows(args.windows_file, "calibration", args.calibration_windows)
        evaluation = saved_windows(args.windows_file, "eval", args.eval_windows)
    else:
        calib = token_windows(tokenizer, load_corpus_text("calibration"), prefix, args.length, args.calibration_windows)
        evaluation = token_windows(tokenizer, load_corpus_text("eval"), prefix, args.length, args.eval_windows)
    if args.save_windows is not None:
        torch.save({"calibration": calib, "eval": evaluation}, args.save_windows)
        return
    if args.mc_questions:
        held_out_text = load_corpus_text("eval")
        if find_spec("lm_eval") is None:
            parser.error('the multiple-choice task needs lm-eval: pip install -e ".[lm-eval]"; or --mc-questions 0')
        args.mc_task_dir = Path(tempfile.mkdtemp(prefix="intactkv-lm-eval-"))  # rebuilt from --seed every run
        questions = continuation_questions(held_out_text, args.mc_questions, seed=args.seed)
        args.mc_task_name = write_lm_eval_task(args.mc_task_dir, questions)

    fp_model = load_model(args.model, args.dtype, args.device)
    fp = perplexity(fp_model, evaluation, args.batch_size, "FP")
    mc_fp = multiple_choice_accuracy(fp_model, tokenizer, args)
    del fp_model
    result = {
        "model": args.model,
        "dtype": str(args.dtype).removeprefix("torch."),
        "calibration_windows": args.calibration_windows,
        "eval_windows": args.eval_windows,
        "window_length": args.length,
        "seed": args.seed,
        "calibration": {
            "epochs": args.cal_epochs, "lr": args.cal_lr, "batch_size": args.cal_batch_size,
            "reference_column": CalibrationSettings.reference().model_dump() if args.cal_reference else None,
        },
        "device_name": (
            torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
        ),
        "machine": platform.platform(),
        "ppl_fp": fp,
        "mc_task": getattr(args, "mc_task_name", None),
        "mc_questions": args.mc_questions,
        "mc_fp": mc_fp,
        "rows": previous_rows(args.out / "quality.json", exclude=names) if args.append else [],
    }
    for name in names:
        logger.info(f"quality benchmark: {name}")
        result["rows"].append(run_recipe(args, name, calib, evaluation, prefix))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / "quality.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
