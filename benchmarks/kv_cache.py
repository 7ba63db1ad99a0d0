"""KV-cache benchmark: perplexity read through quantized caches, bytes per token, and decode throughput.

Rows: the FP cache, K8V8, K4V4, K4V2, K2V4, K3V3 and the norm-driven allocator
at ``--budget`` bits, each *with* the intact prefix (IntactKV splice on and the
prefix slots kept in full precision) and *without* (splice off, prefix quantized
like any token); on FP weights (whose IntactKV prefix is the model's own [BOS]
KV, so only the cache differs) and on GPTQ W3 weights quantized here with
``IntactKVModifier``.

Perplexity is read *through* the cache: each window is prefilled with its first
``--prefill`` tokens, then fed ``--chunk`` tokens per call, so every token attends
to the earlier chunks' stored (quantized) K/V; a single full-sequence forward
would never read the cache. Bytes per token are measured on the cache holding a
whole window, and given at the long-context limit by the formula. Decode
throughput is greedy ``generate`` with the quantized cache against the FP cache,
interleaved in one run, as a ratio. Also reported: the attention-output error of
K4V2 against K2V4 in every layer, under this package's grouping (keys per
channel) and the paper's (both per token).

    python benchmarks/kv_cache.py --model models/pivot-llama --out benchmarks/results

Writes ``kv_cache.json`` and ``kv_cache.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache

from intactkv_modifier import IntactKVModifier, attach_intact_kv, capture_prefix_kv, intact_kv_disabled
from intactkv_modifier.architecture import kv_geometry
from intactkv_modifier.eval.corpus import load_corpus_text
from intactkv_modifier.eval.perplexity import perplexity, saved_windows, token_windows
from intactkv_modifier.kv_quant import (
    KeyFavoredQuantizedCache,
    KeyFavoredQuantizedLayer,
    KVQuantSettings,
    TensorQuantSettings,
    allocate_bits,
    full_precision_bytes_per_token,
    install_kv_quantization,
    quantized_bytes_per_token,
    remove_kv_quantization,
)
from intactkv_modifier.kv_quant.measure import attention_inputs, attention_output_error
from intactkv_modifier.prefix import measured_prefix

UNIFORM = [(8, 8), (4, 4), (4, 2), (2, 4), (3, 3)]


def kv_configs(args: argparse.Namespace, fp_model: PreTrainedModel) -> tuple[dict[str, KVQuantSettings], str]:
    """Name -> settings for every quantized row, and the allocator's report."""
    base = KVQuantSettings.from_bits(4, 2, group_size=args.group_size, residual_length=args.residual_length)
    configs = {
        f"K{k}V{v}": KVQuantSettings.from_bits(k, v, group_size=args.group_size, residual_length=args.residual_length)
        for k, v in UNIFORM
    }
    allocation = allocate_bits(fp_model, args.budget, base=base)
    configs[f"allocator {args.budget:g} bits"] = allocation.settings
    return configs, allocation.markdown()


# perplexity and bytes through a cache ----------------------------------------------


def cache_factory(
    model: PreTrainedModel, settings: KVQuantSettings | None, full_precision_prefix: int
) -> Callable[[], Cache]:
    """Fresh empty caches: the FP ``DynamicCache`` for ``settings=None``, else the quantized one."""
    if settings is None:
        return lambda: DynamicCache(config=model.config)
    return lambda: KeyFavoredQuantizedCache(model.config, settings, full_precision_prefix=full_precision_prefix)


def cache_bytes(cache: Cache) -> int:
    if isinstance(cache, KeyFavoredQuantizedCache):
        return cache.nbytes
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.no_grad()
def cached_perplexity(
    model: PreTrainedModel, windows: torch.Tensor, new_cache: Callable[[], Cache], args: argparse.Namespace
) -> tuple[float, float]:
    """Perplexity with the windows fed in chunks through ``new_cache()``, and the cache's bytes per token."""
    device = model.get_input_embeddings().weight.device
    length = windows.shape[1]
    bounds = [0, args.prefill, *range(args.prefill + args.chunk, length, args.chunk), length]
    total_nll, total_tokens, bytes_per_token = 0.0, 0, []
    for start in range(0, windows.shape[0], args.batch_size):
        batch = windows[start : start + args.batch_size].to(device)
        cache = new_cache()
        for begin, end in zip(bounds, bounds[1:]):
            logits = model(input_ids=batch[:, begin:end], past_key_values=cache, use_cache=True).logits
            targets = batch[:, begin + 1 : end + 1]
            predicted = logits[:, : targets.shape[1]].float()
            nll = torch.nn.functional.cross_entropy(predicted.flatten(0, 1), targets.flatten(), reduction="sum")
            total_nll += float(nll)
            total_tokens += targets.numel()
        bytes_per_token.append(cache_bytes(cache) / batch.numel())
    return math.exp(total_nll / total_tokens), statistics.mean(bytes_per_token)


def limit_bytes_per_token(model: PreTrainedModel, settings: KVQuantSettings | None) -> float:
    """Bytes per token of the whole cache (all layers, K and V) once the FP prefix and residual are negligible."""
    geometry = kv_geometry(model.config)
    heads, head_dim, dtype = geometry.num_key_value_heads, geometry.head_dim, model.dtype
    if settings is None:
        return 2 * geometry.num_layers * full_precision_bytes_per_token(heads, head_dim, dtype)
    return sum(
        quantized_bytes_per_token(tensor, heads, head_dim, dtype)
        for layer in range(geometry.num_layers)
        for tensor in settings.for_layer(layer)
    )


def perplexity_rows(
    model: PreTrainedModel, weights: str, windows: torch.Tensor, configs: dict[str, KVQuantSettings],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    rows = []
    prefix_length = len(args.prefix)
    fp_limit = limit_bytes_per_token(model, None)
    named: list[tuple[str, KVQuantSettings | None]] = [("FP cache", None), *configs.items()]
    for name, settings in named:
        for intact in (True, False):
            new_cache = cache_factory(model, settings, prefix_length if intact else 0)
            started = time.perf_counter()
            with nullcontext() if intact else intact_kv_disabled(model):
                ppl, measured = cached_perplexity(model, windows, new_cache, args)
            limit = limit_bytes_per_token(model, settings)
            rows.append({
                "weights": weights, "kv_cache": name, "intact_prefix": intact, "perplexity": ppl,
                "bytes_per_token_measured": measured, "bytes_per_token_limit": limit,
                "compression_limit": fp_limit / limit, "seconds": round(time.perf_counter() - started, 1),
            })
            logger.info(f"{weights} | {name} | intact prefix {intact}: ppl {ppl:.3f}, {measured:.0f} B/token")
    return rows


# decode throughput ------------------------------------------------------------------


@contextmanager
def timed_cache_updates() -> Iterator[list[float]]:
    """Seconds spent inside the quantized layers' ``update`` (store; on the reference path also dequantize the past)."""
    spent: list[float] = []
    original = KeyFavoredQuantizedLayer.update

    def update(self: KeyFavoredQuantizedLayer, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    KeyFavoredQuantizedLayer.update = update  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        KeyFavoredQuantizedLayer.update = original  # type: ignore[method-assign]


def generate_seconds(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int) -> float:
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
    )
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


@contextmanager
def quantized_kv(model: PreTrainedModel, settings: KVQuantSettings | None) -> Iterator[None]:
    """``generate`` with the quantized cache inside, the FP cache outside (or with ``settings=None``)."""
    if settings is None:
        yield
        return
    install_kv_quantization(model, settings)
    try:
        yield
    finally:
        remove_kv_quantization(model)


def throughput_rows(
    model: PreTrainedModel, windows: torch.Tensor, configs: dict[str, KVQuantSettings], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Decoded tokens/s per row, prefill excluded: ``(N - 1) / (t(N new tokens) - t(1 new token))``.

    Every quantized measurement follows an FP one; each time is the fastest of its
    samples (the FP cache's pooled over all configurations), so that bursts of load
    from other processes inflate neither side of the ratios.
    """
    device = model.get_input_embeddings().weight.device
    prompt = windows[: args.decode_batch, : args.decode_prompt].to(device)
    new_tokens = args.decode_tokens
    generate_seconds(model, prompt, 4)  # warm-up
    seconds: dict[str | None, dict[int, list[float]]] = {
        name: {1: [], new_tokens: []} for name in [None, *configs]
    }
    update_shares: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.decode_repeats):
        for name, settings in configs.items():
            for variant, variant_settings in ((None, None), (name, settings)):
                with quantized_kv(model, variant_settings), timed_cache_updates() as spent:
                    seconds[variant][1].append(generate_seconds(model, prompt, 1))
                    spent.clear()
                    seconds[variant][new_tokens].append(generate_seconds(model, prompt, new_tokens))
                    if variant is not None:
                        update_shares[variant].append(sum(spent) / seconds[variant][new_tokens][-1])
    rate = {
        variant: (new_tokens - 1) / max(min(times[new_tokens]) - min(times[1]), 1e-9)
        for variant, times in seconds.items()
    }
    rows = []
    for name in configs:
        rows.append({
            "kv_cache": name, "fp_tokens_per_s": rate[None], "quantized_tokens_per_s": rate[name],
            "ratio": rate[name] / rate[None], "cache_update_share": statistics.median(update_shares[name]),
        })
        logger.info(f"decode | {name}: {rate[name]:.1f} vs FP {rate[None]:.1f} tokens/s per row")
    return rows


# attention-output error ---------------------------------------------------------------


def attention_error_rows(
    model: PreTrainedModel, windows: torch.Tensor, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """K4V2 against K2V4 per layer, under per-channel keys (this package) and per-token keys (the paper's code)."""
    inputs = attention_inputs(model, windows[: args.batch_size])
    context = windows.shape[1] // 2 + len(args.prefix)
    groupings = {
        "keys per channel, values per token (KIVI)": ("per_channel", "per_token"),
        "keys and values per token (paper's code)": ("per_token", "per_token"),
    }
    rows = []
    for grouping, (key_granularity, value_granularity) in groupings.items():
        for key_bits, value_bits in ((4, 2), (2, 4)):
            settings = KVQuantSettings(
                keys=TensorQuantSettings(bits=key_bits, granularity=key_granularity, group_size=args.group_size),
                values=TensorQuantSettings(bits=value_bits, granularity=value_granularity, group_size=args.group_size),
                residual_length=0,
            )
            errors = [
                attention_output_error(model, inputs, layer, settings, context, full_precision_prefix=len(args.prefix))
                for layer in range(model.config.num_hidden_layers)
            ]
            rows.append({"grouping": grouping, "kv_cache": f"K{key_bits}V{value_bits}", "errors": errors})
    return rows


# models -------------------------------------------------------------------------------


def load_fp(args: argparse.Namespace) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype).to(args.device).eval()
    attach_intact_kv(model, args.prefix, capture_prefix_kv(model, args.prefix))
    return model


def split_windows(args: argparse.Namespace, tokenizer: Any, split: str, count: int) -> torch.Tensor:
    """``count`` windows of ``split``: from ``--windows-file`` (the tokens another run saw), else the corpus."""
    if args.windows_file:
        return saved_windows(args.windows_file, split, count)
    return token_windows(tokenizer, load_corpus_text(split), args.prefix, args.length, count)


def load_gptq(args: argparse.Namespace, tokenizer: Any) -> PreTrainedModel:
    """GPTQ W3 g128 + IntactKV on ``--calibration-windows`` windows of the calibration split, quantized here."""
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype).to(args.device).eval()
    calib = split_windows(args, tokenizer, "calibration", args.calibration_windows)
    gptq = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 3, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
        }}},
        ignore=["lm_head"],
    )
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}),
        recipe=[gptq, IntactKVModifier(prefix_token_ids=args.prefix)],
        num_calibration_samples=args.calibration_windows,
        max_seq_length=args.length,
    )
    return model.eval()


# report -------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Model `{result['model']}` ({result['dtype']}), {result['windows']} held-out windows of {result['length']} "
        f"tokens (`eval` split), prefill {result['prefill']} then chunks of {result['chunk']} through the cache; "
        f"groups of {result['group_size']}, residual window {result['residual_length']} tokens; "
        f"{result['device_name']}, "
        f"{result['threads']} threads, 1-minute load average {result['load_average_start']:.1f} at the start and "
        f"{result['load_average_end']:.1f} at the end. Single-forward FP perplexity (no cache read): "
        f"{result['ppl_single_forward']:.3f}.",
        "",
        "## Perplexity and cache size",
        "",
        "| weights | KV cache | ppl, intact prefix FP | ppl, prefix quantized | B/token at window end | "
        "B/token long-context | compression |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"]
    for with_prefix, without in zip(rows[0::2], rows[1::2]):
        lines.append(
            f"| {with_prefix['weights']} | {with_prefix['kv_cache']} | {with_prefix['perplexity']:.3f} | "
            f"{without['perplexity']:.3f} | {with_prefix['bytes_per_token_measured']:.0f} | "
            f"{with_prefix['bytes_per_token_limit']:.0f} | {with_prefix['compression_limit']:.2f}× |"
        )
    lines += [
        "",
        "## Decode throughput (greedy, FP weights, quantized cache vs FP cache in the same run)",
        "",
        f"Batch {result['decode_batch']}, prompt {result['decode_prompt']} tokens, "
        f"{result['decode_tokens']} new tokens; FP and quantized alternate, {result['decode_repeats']} rounds, "
        "each time the fastest (FP pooled over all rows). "
        "\"time in cache updates\" "
        "is the median share of a quantized generate spent in the cache's `update` (store the new tokens; the "
        "packed attention path reads the past without dequantizing it), "
        "timed on the CPU side (meaningless for an asynchronous GPU).",
        "",
        "| KV cache | FP cache tokens/s | quantized tokens/s | ratio | time in cache updates |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['kv_cache']} | {r['fp_tokens_per_s']:.1f} | {r['quantized_tokens_per_s']:.1f} | {r['ratio']:.2f} | "
        f"{r['cache_update_share']:.0%} |"
        for r in result["decode"]
    ]
    layers = len(result["attention_error"][0]["errors"])
    lines += [
        "",
        "## Attention-output error per layer, FP weights (relative L2; past K/V read from the cache, no residual)",
        "",
        "| grouping | KV cache | " + " | ".join(f"layer {i}" for i in range(layers)) + " | mean |",
        "|---|---|" + "---|" * (layers + 1),
    ]
    lines += [
        f"| {r['grouping']} | {r['kv_cache']} | " + " | ".join(f"{e:.4f}" for e in r["errors"])
        + f" | {statistics.mean(r['errors']):.4f} |"
        for r in result["attention_error"]
    ]
    lines += ["", "## Bit allocation (FP weights)", "", result["allocation"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/pivot-llama")
    parser.add_argument("--weights", nargs="+", default=["FP", "GPTQ W3"], choices=["FP", "GPTQ W3"])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument(
        "--windows-file", type=Path, default=None,
        help="read the windows from a file written by `benchmarks/quality.py --save-windows` instead of the corpus",
    )
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--residual-length", type=int, default=32)
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--decode-batch", type=int, default=1)
    parser.add_argument("--decode-prompt", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--decode-repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    args.prefix = measured_prefix(tokenizer)[0]
    windows = split_windows(args, tokenizer, "eval", args.windows)

    fp_model = load_fp(args)
    configs, allocation = kv_configs(args, fp_model)
    result: dict[str, Any] = {
        "model": args.model, "dtype": str(args.dtype).removeprefix("torch."), "windows": args.windows,
        "length": args.length, "prefill": args.prefill, "chunk": args.chunk, "group_size": args.group_size,
        "residual_length": args.residual_length, "budget": args.budget,
        "decode_batch": args.decode_batch, "decode_prompt": args.decode_prompt,
        "decode_tokens": args.decode_tokens, "decode_repeats": args.decode_repeats,
        "device_name": (
            torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
        ),
        "threads": torch.get_num_threads(), "machine": platform.platform(), "load_average_start": os.getloadavg()[0],
        "settings": {name: settings.to_config_value() for name, settings in configs.items()},
        "allocation": allocation,
        "ppl_single_forward": perplexity(fp_model, windows, args.batch_size, "FP single forward"),
        "rows": [],
    }
    result["attention_error"] = attention_error_rows(fp_model, windows, args)
    result["decode"] = throughput_rows(fp_model, windows, configs, args)
    if "FP" in args.weights:
        result["rows"] += perplexity_rows(fp_model, "FP", windows, configs, args)
    del fp_model
    if "GPTQ W3" in args.weights:
        result["rows"] += perplexity_rows(load_gptq(args, tokenizer), "GPTQ W3 g128", windows, configs, args)

    result["load_average_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / "kv_cache.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
