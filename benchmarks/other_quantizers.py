"""IntactKV on quantizers other than llm-compressor: optimum GPTQ, optimum-quanto, torchao through transformers.

Each route quantizes the model the way its library does, through
:mod:`intactkv_modifier.integrations` (the prefix captured in full precision
before, attached after), and is scored three ways on the same held-out
windows with the same quantized weights: "quantized" (IntactKV off),
"+IntactKV" (the captured prefix) and "+IntactKV+Cal" (the prefix fitted to the
full-precision model's final hidden states on the calibration windows, which
were recorded at capture). The windows are cut from the project corpus exactly
as ``benchmarks/quality.py`` cuts them (the same function, prefix and seed), so
its windows are the first ones of these; each starts with the prefix.

    python benchmarks/other_quantizers.py --model outputs/gemma-3-270m --out benchmarks/results/cpu/gemma-3-270m
    python benchmarks/other_quantizers.py --model outputs/smollm2-135m-instruct --system-prompt \\
        --out benchmarks/results/cpu/smollm2-135m-instruct

Writes ``other_quantizers.json`` and ``other_quantizers.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from loguru import logger
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from intactkv_modifier import attach_intact_kv, intact_kv_disabled
from intactkv_modifier.calibration import CalibrationSettings
from intactkv_modifier.eval.corpus import load_corpus_text
from intactkv_modifier.eval.perplexity import perplexity, token_windows
from intactkv_modifier.eval.report import gap_closed
from intactkv_modifier.integrations import IntactKVSettings, IntactPrefix, load_quantized
from intactkv_modifier.kv_readout import replaced_error
from intactkv_modifier.prefix_kv import PrefixKV

#: The chat template's default system prompt: what every SmolLM2 chat starts with.
SMOLLM2_SYSTEM_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


@dataclass(frozen=True)
class Quantized:
    """A route's result: the model with its prefix attached (fitted, with calibration), and the capture itself."""

    model: PreTrainedModel
    prefix_token_ids: list[int]
    captured: PrefixKV
    fit_seconds: float | None
    calibration: dict | None

    @classmethod
    def of(cls, model: PreTrainedModel) -> Quantized:
        """What :mod:`intactkv_modifier.integrations` left on the model."""
        intact = IntactPrefix.of(model)
        assert intact is not None, "the route attached no intact prefix"
        fit = intact.fit
        return cls(model, intact.prefix_token_ids, intact.prefix_kv, fit and fit.seconds, fit and fit.calibration)


@dataclass(frozen=True)
class Run:
    """What every route gets: the model folder, its tokenizer, the settings, the calibration windows."""

    model: str
    tokenizer: PreTrainedTokenizerBase
    settings: IntactKVSettings
    calibration: torch.Tensor
    group_size: int


def load_fp(run: Run) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(run.model, dtype=torch.float32).eval()


def llmcompressor_gptq(run: Run) -> Quantized:
    """The same W4 through llm-compressor's oneshot and IntactKVModifier, on the same windows, for comparison."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from intactkv_modifier import IntactKVModifier, config_of

    model = load_fp(run)
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=run.group_size)
    gptq = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                        ignore=["lm_head"])
    intactkv = IntactKVModifier(prefix_token_ids=run.settings.prefix_token_ids, calibration=run.settings.calibration)
    rows = run.calibration
    oneshot(
        model=model, processor=run.tokenizer, recipe=[gptq, intactkv],
        dataset=Dataset.from_dict({"input_ids": rows.tolist(), "attention_mask": torch.ones_like(rows).tolist()}),
        num_calibration_samples=rows.shape[0], max_seq_length=rows.shape[1],
    )
    return Quantized(model, intactkv.resolved_prefix_token_ids, intactkv.captured_prefix_kv,
                     intactkv.calibration_seconds, config_of(model).calibration)


def optimum_gptq(run: Run) -> PreTrainedModel:
    from intactkv_modifier.integrations.optimum_gptq import IntactKVGPTQQuantizer

    rows = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in run.calibration]
    # true_sequential=False: one Hessian pass per block instead of one per linear layer, 7x fewer block
    # forwards, so that it fits the 2-core CPU (true_sequential ran at ~18 s per layer, an hour for SmolLM2)
    quantizer = IntactKVGPTQQuantizer(
        bits=4, group_size=run.group_size, dataset=rows, model_seqlen=run.calibration.shape[1], intactkv=run.settings,
        true_sequential=False,
    )
    return quantizer.quantize_model(load_fp(run), run.tokenizer)


def quanto(weights: str) -> Callable[[Run], PreTrainedModel]:
    def route(run: Run) -> PreTrainedModel:
        from optimum import quanto as library

        model = load_fp(run)
        intact = IntactPrefix.capture(model, run.tokenizer, run.settings, run.calibration)
        library.quantize(model, weights=getattr(library, weights), exclude="lm_head")
        library.freeze(model)
        intact.attach(model)
        if run.settings.calibration is not None:
            intact.calibrate(model)
        return model

    return route


def torchao_int4(run: Run) -> PreTrainedModel:
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import TorchAoConfig

    config = TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(run.group_size)))
    return load_quantized(
        run.model, config, intactkv=run.settings, tokenizer=run.tokenizer, calibration_data=run.calibration,
        dtype=torch.float32,
    ).eval()


ROUTES: dict[str, tuple[Callable[[Run], PreTrainedModel | Quantized], str]] = {
    "llmcompressor-gptq-w4": (llmcompressor_gptq, "llm-compressor GPTQ W4 g{group} (IntactKVModifier)"),
    "optimum-gptq-w4": (optimum_gptq, "optimum GPTQ W4 g{group}, true_sequential off (gptqmodel {gptqmodel})"),
    "quanto-int4": (quanto("qint4"), "optimum-quanto int4 (quanto's groups: {quanto_groups})"),
    "quanto-int2": (quanto("qint2"), "optimum-quanto int2 (quanto's groups: {quanto_groups})"),
    "torchao-int4": (torchao_int4, "transformers TorchAoConfig int4 weight-only g{group} (torchao {torchao})"),
}


def quanto_groups(model: str) -> str:
    """The group sizes optimum-quanto picks for the model's linear layers (it offers no setting)."""
    config = AutoConfig.from_pretrained(model).get_text_config()
    widths = sorted({config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_dim})
    return ", ".join(f"{w} wide: {next((g for g in (128, 96, 64, 32) if w % g == 0), 'per channel')}" for w in widths)


def label(name: str, args: argparse.Namespace) -> str:
    fields = {"group": args.group_size, "quanto_groups": args.quanto_groups}
    for package in ("gptqmodel", "torchao"):
        try:
            fields[package] = version(package)
        except Exception:  # noqa: BLE001 (a route whose library is missing fails when it runs, with the reason)
            fields[package] = "?"
    return ROUTES[name][1].format(**fields)


def measure(name: str, run: Run, evaluation: torch.Tensor, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    result = ROUTES[name][0](run)
    quantized = result if isinstance(result, Quantized) else Quantized.of(result)
    model = quantized.model
    row: dict = {"route": name, "label": label(name, args)}
    row["quantize_seconds"] = round(time.perf_counter() - started - (quantized.fit_seconds or 0.0), 1)

    def score(desc: str) -> float:
        return perplexity(model, evaluation, args.batch_size, f"{name}: {desc}", first_target=args.first_target)

    if quantized.calibration is not None:
        row["calibration_seconds"] = round(quantized.fit_seconds, 1)
        row["calibration"] = quantized.calibration
        row["ppl_intactkv_cal"] = score("+IntactKV+Cal")
        attach_intact_kv(model, quantized.prefix_token_ids, quantized.captured)  # same weights, the capture back
    keys, values = replaced_error(model, quantized.prefix_token_ids, quantized.captured)
    row["error_replaced"] = {"keys": keys, "values": values}
    row["ppl_intactkv"] = score("+IntactKV")
    with intact_kv_disabled(model):
        row["ppl_quantized"] = score("quantized")
    return row


def closed_share(fp: float, quantized: float, improved: float | None) -> str:
    """:func:`~intactkv_modifier.eval.report.gap_closed` as the table prints it."""
    share = None if improved is None else gap_closed(fp, quantized, improved)
    return "n/a" if share is None else f"{share:.1%}"


def markdown(result: dict) -> str:
    fp = result["ppl_fp"]
    cal = result["calibration"]
    lines = [
        f"Model `{result['model']}` (float32), prefix {result['prefix_description']} ({result['prefix_length']} "
        f"tokens); {result['eval_windows']} held-out windows of {result['window_length']} tokens from the project "
        f"corpus, each starting with the prefix; perplexity counts the tokens at positions {result['first_target']}.."
        f"{result['window_length'] - 1} of each window. {result['calibration_windows']} calibration windows (GPTQ's "
        f"samples; the first {cal['num_samples']} are IntactKV+Cal's: {cal['epochs']} epochs, batch "
        f"{cal['batch_size']}, AdamW lr {cal['lr']}); seed {result['seed']}; {result['machine_description']}.",
        "",
        "| quantizer | quantized | +IntactKV | +IntactKV+Cal | gap closed (IntactKV / +Cal) | quantize s | +Cal s |",
        "|---|---|---|---|---|---|---|",
        f"| FP (float32) | {fp:.3f} | | | | | |",
    ]
    for row in result["rows"]:
        with_cal = row.get("ppl_intactkv_cal")
        quantized = row["ppl_quantized"]
        closed = f"{closed_share(fp, quantized, row['ppl_intactkv'])} / {closed_share(fp, quantized, with_cal)}"
        lines.append(
            f"| {row['label']} | {row['ppl_quantized']:.3f} | {row['ppl_intactkv']:.3f} | "
            f"{'' if with_cal is None else f'{with_cal:.3f}'} | {closed} | {row['quantize_seconds']} | "
            f"{row.get('calibration_seconds', '')} |"
        )
    for failure in result.get("not_run", []):
        lines.append(f"| {failure['route']} | does not run: {failure['reason']} | | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--system-prompt", action="store_true",
                        help="the prefix is SmolLM2's chat-template system prompt (else the tokenizer's [BOS])")
    parser.add_argument("--routes", nargs="+", default=[r for r in ROUTES if not r.startswith("llmcompressor")],
                        choices=list(ROUTES))
    parser.add_argument("--group-size", type=int, default=128, help="GPTQ and torchao group size")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cal-samples", type=int, default=16, help="0 skips IntactKV+Cal")
    parser.add_argument("--cal-epochs", type=int, default=4)
    parser.add_argument("--cal-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--append", action="store_true", help="keep other routes' rows already in --out")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.system_prompt:
        prefix = tokenizer(SMOLLM2_SYSTEM_PROMPT, add_special_tokens=True)["input_ids"]
        description = "the chat template's system prompt"
    else:
        prefix = [tokenizer.bos_token_id]
        description = "`[BOS]`"
    # a system prompt is never predicted in a chat: count what follows it; after [BOS], every token (as quality.py)
    args.first_target = len(prefix) if args.system_prompt else 1
    def windows(split: str, count: int) -> torch.Tensor:
        return token_windows(tokenizer, load_corpus_text(split), prefix, args.length, count)

    calibration, evaluation = windows("calibration", args.calibration_windows), windows("eval", args.eval_windows)
    settings = CalibrationSettings(num_samples=args.cal_samples, epochs=args.cal_epochs, lr=args.cal_lr, seed=args.seed)
    run = Run(
        model=args.model, tokenizer=tokenizer, calibration=calibration, group_size=args.group_size,
        settings=IntactKVSettings(prefix_token_ids=prefix, calibration=settings if args.cal_samples else None),
    )
    args.quanto_groups = quanto_groups(args.model)

    out = args.out / "other_quantizers.json"
    previous = json.loads(out.read_text()) if args.append and out.exists() else {}
    fp_model = load_fp(run)
    fp = previous.get("ppl_fp") or perplexity(
        fp_model, evaluation, args.batch_size, "FP", first_target=args.first_target
    )
    del fp_model
    result = {
        "model": args.model,
        "prefix_token_ids": prefix,
        "prefix_description": description,
        "prefix_length": len(prefix),
        "first_target": args.first_target,
        "window_length": args.length,
        "eval_windows": args.eval_windows,
        "calibration_windows": args.calibration_windows,
        "calibration": settings.model_dump(),
        "seed": args.seed,
        "group_size": args.group_size,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "machine_description": f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}",
        "ppl_fp": fp,
        "rows": [row for row in previous.get("rows", []) if row["route"] not in args.routes],
        "not_run": [row for row in previous.get("not_run", []) if row["route"] not in args.routes],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")  # the FP row, reused by --append
    for name in args.routes:
        logger.info(f"other quantizers: {name}")
        try:
            result["rows"].append(measure(name, run, evaluation, args))
            gc.collect()  # the route's model, before the next loads
        except Exception as error:  # noqa: BLE001 (a route that does not run is a result too: say why)
            logger.exception(f"{name} does not run")
            result["not_run"].append({"route": name, "reason": f"{type(error).__name__}: {error}"[:300]})
        out.write_text(json.dumps(result, indent=2) + "\n")
    order = list(ROUTES)
    result["rows"].sort(key=lambda row: order.index(row["route"]))
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / "other_quantizers.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
