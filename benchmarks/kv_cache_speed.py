"""Decode speed, memory and perplexity of KV caches side by side: FP, transformers' QuantizedCache, ours.

Rows: ``DynamicCache`` (FP); transformers' ``QuantizedCache`` with optimum-quanto
int4 and int2 and with HQQ int4 (where the backend is installed and runs); ours,
``KeyFavoredQuantizedCache`` K4V2 and K2V2, each on the packed attention path and
on the reference path (dequantize the past, then attend).

Speed is measured on a random-weight Llama shape (``--hidden`` ...): each context
is prefilled once with the FP cache and its K/V written into every cache (so no
cache pays, or differs by, a prefill), then ``--steps`` greedy tokens are decoded
through the model's forward. Caches alternate within each round and each figure
is the median over ``--rounds``, so load from other processes hits every row
alike. At batch 1, and at the largest batch whose cache fits ``--budget-mib``
(bytes per row measured on the batch-1 cache at the end of decoding; at most
``--max-batch``; rows are copies of the batch-1 prompt, which costs the same to
decode). Memory: the bytes of every tensor storage the cache keeps alive (found
by walking it, so quanto and HQQ tensors count too); on CUDA also the peak memory
allocated while decoding at batch 1.

Perplexity is the real model's (``--model``, IntactKV prefix = its own [BOS] KV)
read through each cache in chunks, as ``benchmarks/kv_cache.py`` does (``--windows-file``:
the windows another benchmark saved, so that tables share their tokens); a cache
that refuses the model is listed with its error. ``--profile-context N`` adds
``kv_cache_profile.md``: torch.profiler's top ops of batch-1 decoding at context
``N``, FP cache against ours K4V2 packed, which says where a shortfall comes from.

    python benchmarks/kv_cache_speed.py --out benchmarks/results/cpu

Writes ``kv_cache_speed.json`` and ``kv_cache_speed.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kv_cache import cached_perplexity, limit_bytes_per_token, load_fp, split_windows
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, PreTrainedModel
from transformers.cache_utils import Cache, QuantizedCache

from intactkv_modifier.kv_quant import KeyFavoredQuantizedCache, KVQuantSettings
from intactkv_modifier.kv_quant.attention import packed_implementation
from intactkv_modifier.kv_quant.fast_decode import kernel_available
from intactkv_modifier.prefix import measured_prefix


@dataclass(frozen=True)
class CacheKind:
    """One row of the comparison: a name and how to build an empty cache for a model."""

    name: str
    build: Callable[[PreTrainedModel], Cache]
    #: ours: the settings, whose packed size per token the held bytes are compared with
    settings: KVQuantSettings | None = None


def cache_kinds(args: argparse.Namespace) -> list[CacheKind]:
    kinds = [CacheKind("FP (DynamicCache)", lambda model: DynamicCache(config=model.config))]
    for backend, bits in (("quanto", 4), ("quanto", 2), ("hqq", 4)):
        kinds.append(CacheKind(
            f"QuantizedCache {backend} int{bits}",
            lambda model, backend=backend, bits=bits: QuantizedCache(
                backend, model.config, nbits=bits, q_group_size=args.group_size, residual_length=args.residual_length
            ),
        ))
    for key_bits, value_bits in ((4, 2), (2, 2)):
        settings = KVQuantSettings.from_bits(
            key_bits, value_bits, group_size=args.group_size, residual_length=args.residual_length
        )
        for path, packed in (("packed", True), ("reference", False)):
            kinds.append(CacheKind(
                f"ours {settings.label()} {path}",
                lambda model, settings=settings, packed=packed: KeyFavoredQuantizedCache(
                    model.config, settings, full_precision_prefix=args.prefix_length, packed_attention=packed
                ),
                settings,
            ))
    return kinds


def held_bytes(root: object) -> int:
    """Bytes of every distinct tensor storage reachable from ``root`` (attributes, containers, tensor subclasses)."""
    storages: dict[int, int] = {}
    visited: set[int] = set()

    def visit(item: object) -> None:
        if id(item) in visited or isinstance(item, (type, torch.nn.Module, str, bytes, int, float)):
            return
        visited.add(id(item))
        if isinstance(item, torch.Tensor):
            if type(item) is not torch.Tensor and hasattr(item, "__tensor_flatten__"):
                for name in item.__tensor_flatten__()[0]:
                    visit(getattr(item, name))
                return
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            for value in item.values():
                visit(value)
        elif isinstance(item, (list, tuple, set)):
            for value in item:
                visit(value)
        elif hasattr(item, "__dict__"):
            visit(vars(item))

    visit(root)
    return sum(storages.values())


# decode speed ---------------------------------------------------------------------------


def speed_model(args: argparse.Namespace) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or args.hidden * 2,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=max(args.contexts) + args.steps + 1,
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # initialised where it runs: a 1B model's random init on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attention, dtype=args.dtype)
    model = model.eval()
    model.set_attn_implementation(packed_implementation(args.attention))  # unpacked caches fall back to it
    return model


@torch.no_grad()
def prefilled_kv(model: PreTrainedModel, context: int, args: argparse.Namespace) -> tuple[list, torch.Tensor]:
    """Per layer the FP (keys, values) of a random ``context``-token prompt, and the first token to decode."""
    generator = torch.Generator().manual_seed(args.seed + context)
    prompt = torch.randint(4, args.vocab, (1, context), generator=generator).to(args.device)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
    return [(layer.keys, layer.values) for layer in cache.layers], logits[:, -1:].argmax(-1)


def filled(kind: CacheKind, model: PreTrainedModel, kv: list, batch: int) -> Cache:
    """A fresh cache of ``kind`` holding the prefilled K/V, copied to ``batch`` rows."""
    cache = kind.build(model)
    for layer_idx, (keys, values) in enumerate(kv):
        cache.update(keys.expand(batch, -1, -1, -1).clone(), values.expand(batch, -1, -1, -1).clone(), layer_idx)
    return cache


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def decode(model: PreTrainedModel, cache: Cache, first: torch.Tensor, steps: int, device: str) -> float:
    """Tokens per second (all rows) over ``steps`` greedy steps."""
    token = first
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    synchronize(device)
    return first.shape[0] * steps / (time.perf_counter() - started)


def speed_rows(args: argparse.Namespace, kinds: list[CacheKind]) -> Iterator[list[dict[str, Any]]]:
    """The rows of each context in turn (so that a run cut short still leaves the contexts it finished)."""
    model = speed_model(args)
    for context in args.contexts:
        rows = []
        kv, first = prefilled_kv(model, context, args)
        runnable, batch1, bytes_per_row, peaks = [], {}, {}, {}
        for kind in kinds:
            try:
                cache = filled(kind, model, kv, 1)
                decode(model, cache, first, 2, args.device)  # warm-up; also checks that the backend runs
                runnable.append(kind)
                batch1[kind.name] = []
            except Exception as error:  # noqa: BLE001 (a backend that does not run here is a result, not a crash)
                logger.warning(f"{kind.name} does not run here: {error!r:.200}")
        for _ in range(args.rounds):
            for kind in runnable:
                cache = filled(kind, model, kv, 1)
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                batch1[kind.name].append(decode(model, cache, first, args.steps, args.device))
                bytes_per_row[kind.name] = held_bytes(cache)
                if args.device.startswith("cuda"):
                    peaks[kind.name] = torch.cuda.max_memory_allocated()
                del cache
        batches = {
            kind.name: max(1, min(args.max_batch, args.budget_mib * 2**20 // bytes_per_row[kind.name]))
            for kind in runnable
        }
        budget: dict[str, list[float]] = {kind.name: [] for kind in runnable}
        for _ in range(args.budget_rounds):
            for kind in runnable:
                cache = filled(kind, model, kv, batches[kind.name])
                budget[kind.name].append(
                    decode(model, cache, first.expand(batches[kind.name], -1), args.budget_steps, args.device)
                )
                del cache
        fp = statistics.median(batch1[kinds[0].name])
        fp_budget = statistics.median(budget[kinds[0].name])
        for kind in runnable:
            rate, budget_rate = statistics.median(batch1[kind.name]), statistics.median(budget[kind.name])
            packed = None if kind.settings is None else limit_bytes_per_token(model, kind.settings)
            rows.append({
                "context": context, "kv_cache": kind.name,
                "tokens_per_s_batch1": rate, "ratio_to_fp_batch1": rate / fp,
                "bytes_per_row": bytes_per_row[kind.name],
                "bytes_per_token": bytes_per_row[kind.name] / (context + args.steps),
                "packed_bytes_per_token": packed,
                "held_over_packed": None if packed is None else bytes_per_row[kind.name] / (context + args.steps)
                / packed,
                "peak_bytes_batch1": peaks.get(kind.name),
                "budget_batch": batches[kind.name], "tokens_per_s_budget": budget_rate,
                "ratio_to_fp_budget": budget_rate / fp_budget,
            })
            logger.info(f"context {context} | {kind.name}: {rate:.1f} tok/s ({rate / fp:.2f}x FP), "
                        f"batch {batches[kind.name]}: {budget_rate:.1f} tok/s ({budget_rate / fp_budget:.2f}x)")
        del kv
        yield rows


def profile_batch1(args: argparse.Namespace, kinds: list[CacheKind]) -> str:
    """Where a batch-1 decode step spends its time, FP cache against ours K4V2 packed (torch.profiler, top ops)."""
    model = speed_model(args)
    context = args.profile_context
    kv, first = prefilled_kv(model, context, args)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sections = []
    for kind in (kinds[0], next(kind for kind in kinds if kind.name.endswith("packed"))):
        cache = filled(kind, model, kv, 1)
        decode(model, cache, first, 4, args.device)
        with torch.profiler.profile(activities=activities) as profiler:
            rate = decode(model, cache, first, args.steps, args.device)
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48)
        sections += [f"### {kind.name}, context {context}: {rate:.1f} tok/s under the profiler, {args.steps} steps",
                     "", "```", table, "```", ""]
    return "\n".join(sections)


# perplexity ----------------------------------------------------------------------------


def perplexity_rows(args: argparse.Namespace, kinds: list[CacheKind]) -> list[dict[str, Any]]:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    args.prefix = measured_prefix(tokenizer)[0]
    windows = split_windows(args, tokenizer, "eval", args.windows)
    model = load_fp(args)
    model.set_attn_implementation(packed_implementation(model.config._attn_implementation))
    rows = []
    for kind in kinds:
        try:
            ppl, measured = cached_perplexity(model, windows, lambda kind=kind: kind.build(model), args)
        except Exception as error:  # noqa: BLE001
            logger.warning(f"perplexity with {kind.name} failed: {error!r:.200}")
            rows.append({"kv_cache": kind.name, "perplexity": None, "error": f"{error}"[:300]})
            continue
        rows.append({"kv_cache": kind.name, "perplexity": ppl})
        logger.info(f"perplexity | {kind.name}: {ppl:.3f}")
    return rows


# report ---------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    shape = result["speed_model"]
    lines = [
        f"{result['device_name']}, {result['threads']} thread(s), load average {result['load_average_start']:.1f} "
        f"at the start and {result['load_average_end']:.1f} at the end (a shared machine: ratios are medians of "
        f"{result['rounds']} interleaved rounds). Speed model: random-weight Llama shape, {shape['layers']} layers, "
        f"hidden {shape['hidden']}, MLP {shape['intermediate']}, {shape['heads']} heads on {shape['kv_heads']} KV "
        f"heads (head_dim {shape['hidden'] // shape['heads']}), {result['dtype']}, {result['attention']} attention "
        f"under the packed path's fallback; seed {result['seed']}; {result['steps']} decoded tokens after each "
        f"context (budget batch: "
        f"{result['budget_steps']} tokens, {result['budget_rounds']} round(s)); Triton decode kernel "
        f"{'on' if result['decode_kernel'] else 'off (torch ops)'} for ours packed; groups of {result['group_size']}, "
        f"residual {result['residual_length']} tokens for every quantized cache (transformers' quantizes keys and "
        f"values per channel groups along head_dim, axis 0).",
    ]
    if result["speed"]:
        lines += [
            "",
            f"## Decode tokens/s, batch 1 and the largest batch whose cache fits {result['budget_mib']} MiB",
            "",
            "| context | KV cache | tok/s, batch 1 | × FP | bytes/token held | × packed size | peak MiB, batch 1 "
            "| batch in budget | tok/s in budget | × FP |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    lines += [
        f"| {r['context']} | {r['kv_cache']} | {r['tokens_per_s_batch1']:.1f} | {r['ratio_to_fp_batch1']:.2f} | "
        f"{r['bytes_per_token']:.0f} | {_optional(r['held_over_packed'], '.3f')} | "
        f"{_optional(r['peak_bytes_batch1'] and r['peak_bytes_batch1'] / 2**20, '.0f')} | {r['budget_batch']} | "
        f"{r['tokens_per_s_budget']:.1f} | {r['ratio_to_fp_budget']:.2f} |"
        for r in result["speed"]
    ]
    if result["perplexity"]:
        lines += [
            "",
            f"## Perplexity of `{result['model']}` read through each cache ({result['windows']} windows of "
            f"{result['length']} tokens, prefill {result['prefill']}, chunks of {result['chunk']})",
            "",
            "| KV cache | perplexity |",
            "|---|---|",
        ]
        lines += [
            f"| {r['kv_cache']} | {_optional(r['perplexity'], '.3f')} |" if r["perplexity"] is not None
            else f"| {r['kv_cache']} | does not run: {r['error'].splitlines()[0]} |"
            for r in result["perplexity"]
        ]
    return "\n".join(lines) + "\n"


def _optional(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def versions() -> dict[str, str | None]:
    """Versions of the packages whose code the rows run."""
    found: dict[str, str | None] = {}
    for package in ("torch", "transformers", "triton", "optimum-quanto", "hqq"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def write(result: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_cache_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "kv_cache_speed.md").write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget-mib", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--budget-steps", type=int, default=4)
    parser.add_argument("--budget-rounds", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=0, help="MLP width (0: twice --hidden)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--residual-length", type=int, default=32)
    parser.add_argument("--prefix-length", type=int, default=1)
    parser.add_argument("--model", default="models/pivot-llama")
    parser.add_argument("--skip-perplexity", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--profile-context", type=int, default=0,
                        help="also profile batch-1 decoding at this context (kv_cache_profile.md)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--windows-file", type=Path, help="windows saved by quality.py --save-windows (eval split)")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: a shared machine punishes more)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)

    kinds = cache_kinds(args)
    result: dict[str, Any] = {
        "device_name": (
            torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
        ),
        "machine": platform.platform(), "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg()[0], "dtype": str(args.dtype).removeprefix("torch."),
        "attention": args.attention, "seed": args.seed, "steps": args.steps, "rounds": args.rounds,
        "budget_mib": args.budget_mib, "budget_steps": args.budget_steps, "budget_rounds": args.budget_rounds,
        "group_size": args.group_size, "residual_length": args.residual_length,
        "speed_model": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
                        "intermediate": args.intermediate or 2 * args.hidden, "vocab": args.vocab},
        "model": args.model, "windows": args.windows,
        "windows_file": args.windows_file and str(args.windows_file), "length": args.length, "prefill": args.prefill,
        "chunk": args.chunk, "versions": versions(),
        "decode_kernel": kernel_available(torch.device(args.device)),
    }
    result["speed"], result["perplexity"] = [], []
    for rows in ([] if args.skip_speed else speed_rows(args, kinds)):
        result["speed"] += rows
        result["load_average_end"] = os.getloadavg()[0]
        write(result, args.out)
    if args.profile_context:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kv_cache_profile.md").write_text(profile_batch1(args, kinds))
    result["perplexity"] = [] if args.skip_perplexity else perplexity_rows(args, kinds)
    result["load_average_end"] = os.getloadavg()[0]
    print(write(result, args.out))


if __name__ == "__main__":
    main()
