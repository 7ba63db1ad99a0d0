"""Decode speed, memory and perplexity of KV caches side by side: FP, transformers' QuantizedCache, ours.

Rows: ``DynamicCache`` (FP); transformers' ``StaticCache`` (FP) with the forward
under ``torch.compile`` (``--compiled``; ``mode="reduce-overhead"``, CUDA graphs, on
a GPU, inductor's default on a CPU); transformers' ``QuantizedCache`` with
optimum-quanto int4 and int2 and with HQQ int4 (where the backend is installed and
runs); ours, ``KeyFavoredQuantizedCache`` K4V2 and K2V2, each on the packed
attention path and on the reference path (dequantize the past, then attend); with
``--compiled`` also ours K4V2 static (``StaticKeyFavoredQuantizedCache``) under the
same compile, with its decode attention (``static_implementation``: the Triton kernel over the stored codes
on a GPU, sums that inductor fuses with the reads on a CPU) and, with ``--static-attention both``, with the plain
``--attention`` over the past the step reads out in full precision.

Speed is measured on a random-weight Llama shape (``--hidden`` ...): each context
is prefilled once with the FP cache and its K/V written into every cache (so no
cache pays, or differs by, a prefill), then ``--steps`` greedy tokens are decoded
through the model's forward. Caches alternate within each round and each figure
is the median over ``--rounds``, so load from other processes hits every row
alike; positions are passed as ``generate`` passes them. At batch 1
(``--batch1-contexts``), at one batch for every cache (``--equal-batch`` at
``--equal-batch-contexts``) and at the largest batch whose cache fits
``--budget-mib`` (``--budget-contexts``; bytes per row measured on the batch-1
cache at the end of decoding; at most ``--max-batch``); rows are copies of the
batch-1 prompt, which costs the same to decode, and each context option defaults
to every context. ``--bandwidth-gbs`` (the device's memory bandwidth) adds every
figure as a share of the physical limit: a step reads at least the weights (all
but the input embeddings) and every row's cache once. Memory: the bytes of every
tensor storage the cache keeps alive (found by walking it, so quanto and HQQ
tensors count too); on CUDA also the peak memory allocated while decoding at batch 1.

Perplexity is the real model's (``--model``, IntactKV prefix = its own [BOS] KV)
read through each cache in chunks, as ``benchmarks/kv_cache.py`` does (``--windows-file``:
the windows another benchmark saved, so that tables share their tokens); a cache
that refuses the model is listed with its error. ``--profile-context N`` adds
``kv_cache_profile.md``: torch.profiler's top ops of batch-1 decoding at context
``N``, FP cache against ours K4V2 packed (and with ``--compiled`` FP ``StaticCache``
against ours static), with each step's wall time and, on a GPU, the device's busy
time: which says where a shortfall comes from; for the eager rows also the Python the caches and attention
functions run a step (cProfile). ``--rows`` keeps only some caches (FP
``DynamicCache`` always, every ratio's base); ``--static-tuning KEY=VALUE ...`` sets
the launch of ours static's Triton kernel for the run (``static_kernel_attention``'s
keywords: what ``static_kernel_sweep.py`` measured alone, measured end to end).

    python benchmarks/kv_cache_speed.py --compiled --out benchmarks/results/cpu

The issue-23 rows on one GPU (1B shape, bf16; ``--bandwidth-gbs``: 4800 on an H200, 3350 on an H100 SXM). Each
call stays under the ten-minute limit by few compiled shapes (every context and batch is one more compile and CUDA
graph capture for each compiled row, FP static and ours static); each context's rows are written as it finishes,
so a call cut short by ``timeout`` keeps the contexts it did. Batch 1 at 16K first (both attentions for ours static),
then 4K batch 1 and 8K at batch 16, then 32K at batch 1 and in the 16 GiB budget:

    ARGS="--device cuda --dtype bfloat16 --threads 16 --hidden 2048 --intermediate 8192 --layers 16 --heads 32
          --kv-heads 8 --vocab 128256 --steps 64 --rounds 3 --budget-steps 16 --budget-rounds 3 --budget-mib 16384
          --max-batch 128 --compiled --skip-perplexity --bandwidth-gbs 4800"
    timeout 590 python benchmarks/kv_cache_speed.py $ARGS --contexts 16384 --budget-contexts --static-attention both \
        --out benchmarks/results/gpu/static-16k
    timeout 590 python benchmarks/kv_cache_speed.py $ARGS --contexts 4096 8192 --batch1-contexts 4096 \
        --equal-batch 16 --equal-batch-contexts 8192 --budget-contexts --out benchmarks/results/gpu/static-4k-8k
    timeout 590 python benchmarks/kv_cache_speed.py $ARGS --contexts 32768 --out benchmarks/results/gpu/static-32k

Writes ``kv_cache_speed.json`` and ``kv_cache_speed.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import importlib.metadata
import inspect
import json
import os
import platform
import pstats
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kv_cache import cached_perplexity, limit_bytes_per_token, load_fp, split_windows
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, PreTrainedModel
from transformers.cache_utils import Cache, QuantizedCache, StaticCache

from intactkv_modifier.kv_quant import (
    KeyFavoredQuantizedCache,
    KVQuantSettings,
    StaticKeyFavoredQuantizedCache,
    cpu_kernel,
    static_implementation,
)
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
    #: static shapes: the forward runs compiled, over one cache object per batch refilled every round
    compiled: bool = False
    #: compiled with our static decode attention (``static_implementation``) instead of the plain ``--attention``
    fused_attention: bool = False


def cache_kinds(args: argparse.Namespace) -> list[CacheKind]:
    kinds = [CacheKind("FP (DynamicCache)", lambda model, length: DynamicCache(config=model.config))]
    if args.compiled:
        kinds.append(CacheKind(
            "FP (StaticCache) compiled",
            lambda model, length: StaticCache(config=model.config, max_cache_len=length),
            compiled=True,
        ))
    for backend, bits in (("quanto", 4), ("quanto", 2), ("hqq", 4)):
        kinds.append(CacheKind(
            f"QuantizedCache {backend} int{bits}",
            lambda model, length, backend=backend, bits=bits: QuantizedCache(
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
                lambda model, length, settings=settings, packed=packed: KeyFavoredQuantizedCache(
                    model.config, settings, full_precision_prefix=args.prefix_length, packed_attention=packed
                ),
                settings,
            ))
        if args.compiled and (key_bits, value_bits) == (4, 2):
            for attention in STATIC_ATTENTIONS[args.static_attention]:
                fused = attention == "fused"
                kinds.append(CacheKind(
                    f"ours {settings.label()} static compiled" + ("" if fused else f", {attention}"),
                    lambda model, length, settings=settings, fused=fused: StaticKeyFavoredQuantizedCache(
                        model.config, settings, length, full_precision_prefix=args.prefix_length,
                        static_attention=fused,  # built with the eager model's config: say which copy reads it
                    ),
                    settings, compiled=True, fused_attention=fused,
                ))
    return kinds


#: ``--static-attention``: the attention(s) ours static is compiled with (fused: ``static_implementation``, the
#: Triton kernel on a GPU; plain: ``--attention``, which reads a dequantized copy of the past written out by the step)
STATIC_ATTENTIONS = {"fused": ("fused",), "plain": ("plain",), "both": ("fused", "plain")}


def selected_kinds(kinds: list[CacheKind], rows: list[str] | None) -> list[CacheKind]:
    """The kinds whose name holds one of ``rows`` (all without it); FP ``DynamicCache``, every ratio's base, always."""
    return [kind for kind in kinds if rows is None or kind is kinds[0] or any(row in kind.name for row in rows)]


def apply_static_tuning(pairs: list[str]) -> dict[str, int]:
    """``KEY=VALUE`` launch settings of the static cache's decode kernel for this process (keywords of
    ``static_kernel_attention``), so that a tuning the kernel sweep found is measured end to end before it
    becomes the default."""
    from intactkv_modifier.kv_quant import static_decode_kernel  # imports triton: only when asked

    launch = static_decode_kernel.static_kernel_attention
    known = [name for name, parameter in inspect.signature(launch).parameters.items() if parameter.default is not
             inspect.Parameter.empty]
    tuning = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in known or not value.isdigit():
            raise SystemExit(f"--static-tuning {pair!r}: expected KEY=INTEGER with KEY one of {known}")
        tuning[key] = int(value)
    # fast_decode imports the kernel's launch at each call, so the compiled step traces the tuned one
    static_decode_kernel.static_kernel_attention = functools.partial(launch, **tuning)
    return tuning


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


def speed_model(args: argparse.Namespace, attention: str = "packed") -> PreTrainedModel:
    """The random-weight model (``seed``: the same weights on every call) with ``attention``: ``packed`` (our
    packed path, falling back to ``--attention`` for other caches), ``plain`` (``--attention``) or ``fused``
    (the static cache's decode attention, ``static_implementation``, over ``--attention``)."""
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or args.hidden * 2,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=max(args.contexts) + args.steps + 8,
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # initialised where it runs: a 1B model's random init on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attention, dtype=args.dtype)
    model = model.eval()
    if attention == "packed":
        model.set_attn_implementation(packed_implementation(args.attention))  # unpacked caches fall back to it
    elif attention == "fused":
        model.set_attn_implementation(static_implementation(args.attention))
    return model


@dataclass
class Decoder:
    """Decodes through the model eager, or (compiled kinds) through a compiled forward of a copy of it.

    A compiled copy has plain ``--attention`` (no packed attention function for the compiler to trace), or our
    static decode attention for ours static; the same weights (same seed). The decoder keeps one static cache per
    kind, batch and length, refilled every round: a new cache object would make the compiled graph and its CUDA
    graphs be built again inside the timing.
    """

    args: argparse.Namespace
    model: PreTrainedModel
    compiled_forwards: dict[bool, Callable[..., Any]] = field(default_factory=dict)
    static_caches: dict[tuple[str, int, int], Cache] = field(default_factory=dict)

    def forward(self, kind: CacheKind) -> Callable[..., Any]:
        if not kind.compiled:
            return self.model
        if kind.fused_attention not in self.compiled_forwards:
            copy = speed_model(self.args, "fused" if kind.fused_attention else "plain")
            mode = "reduce-overhead" if self.args.device.startswith("cuda") else None
            # one graph per context and batch: past the default limit (8) dynamo would fall back to eager unseen
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.compiled_forwards[kind.fused_attention] = torch.compile(copy.forward, mode=mode, dynamic=False)
        return self.compiled_forwards[kind.fused_attention]

    def filled(self, kind: CacheKind, kv: list, batch: int) -> Cache:
        """A cache of ``kind`` holding the prefilled K/V, copied to ``batch`` rows (room for the decoded tokens)."""
        length = kv[0][0].shape[2] + max(self.args.steps, self.args.budget_steps, WARM_UP_STEPS) + 1
        key = (kind.name, batch, length)
        if kind.compiled and key in self.static_caches:
            cache = self.static_caches[key]
            cache.reset()
        else:
            cache = kind.build(self.model, length)
            if kind.compiled:  # one per kind at a time: a budget batch's is large
                self.static_caches = {k: c for k, c in self.static_caches.items() if k[0] != kind.name}
                self.static_caches[key] = cache
        for layer_idx, (keys, values) in enumerate(kv):
            cache.update(keys.expand(batch, -1, -1, -1).clone(), values.expand(batch, -1, -1, -1).clone(), layer_idx)
        return cache

    def rate(self, kind: CacheKind, kv: list, first: torch.Tensor, steps: int) -> float:
        """Tokens per second (all rows of ``first``) over ``steps`` greedy steps from a freshly filled cache."""
        return self.decode(kind, self.filled(kind, kv, first.shape[0]), first, kv[0][0].shape[2], steps)

    @torch.no_grad()
    def decode(self, kind: CacheKind, cache: Cache, first: torch.Tensor, start: int, steps: int) -> float:
        """Tokens per second over ``steps`` greedy steps after the ``start`` tokens ``cache`` holds."""
        forward, token = self.forward(kind), first
        synchronize(self.args.device)
        started = time.perf_counter()
        for step in range(steps):
            positions = torch.full_like(token, start + step)
            token = forward(input_ids=token, position_ids=positions, past_key_values=cache, use_cache=True)
            token = token.logits[:, -1:].argmax(-1)
        synchronize(self.args.device)
        return first.shape[0] * steps / (time.perf_counter() - started)


#: Steps run before timing each cache at each batch (a compiled forward is compiled, then its CUDA graph recorded)
WARM_UP_STEPS = 3


@torch.no_grad()
def prefilled_kv(model: PreTrainedModel, context: int, args: argparse.Namespace) -> tuple[list, torch.Tensor]:
    """Per layer the FP (keys, values) of a random ``context``-token prompt, and the first token to decode."""
    generator = torch.Generator().manual_seed(args.seed + context)
    prompt = torch.randint(4, args.vocab, (1, context), generator=generator).to(args.device)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
    return [(layer.keys, layer.values) for layer in cache.layers], logits[:, -1:].argmax(-1)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_rates(
    decoder: Decoder, kinds: list[CacheKind], kv: list, first: torch.Tensor, batches: dict[str, int], steps: int,
    rounds: int,
) -> dict[str, float]:
    """Median tokens/s of each kind at its batch, kinds interleaved within each round, after a warm-up each."""
    firsts = {kind.name: first.expand(batches[kind.name], -1).contiguous() for kind in kinds}  # strides as argmax's
    for kind in kinds:
        decoder.rate(kind, kv, firsts[kind.name], WARM_UP_STEPS)
    rates: dict[str, list[float]] = {kind.name: [] for kind in kinds}
    for _ in range(rounds):
        for kind in kinds:
            rates[kind.name].append(decoder.rate(kind, kv, firsts[kind.name], steps))
    return {name: statistics.median(values) for name, values in rates.items()}


def weight_bytes(model: PreTrainedModel) -> int:
    """Bytes of the weights a decode step reads: all but the input embeddings (one row of those per token)."""
    embeddings = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embeddings)


def bandwidth_share(rate: float | None, batch: int, bytes_per_row: int, weights: int, args: argparse.Namespace):
    """The measured rate over the rate at which reading the weights and every row's cache once takes all the time."""
    if rate is None or not args.bandwidth_gbs:
        return None
    limit = batch / ((weights + batch * bytes_per_row) / (args.bandwidth_gbs * 1e9))
    return rate / limit


def speed_rows(args: argparse.Namespace, kinds: list[CacheKind]) -> Iterator[list[dict[str, Any]]]:
    """The rows of each context in turn (so that a run cut short still leaves the contexts it finished)."""
    decoder = Decoder(args, speed_model(args))
    weights = weight_bytes(decoder.model)
    for context in args.contexts:
        kv, first = prefilled_kv(decoder.model, context, args)
        runnable, bytes_per_row, peaks = [], {}, {}
        for kind in kinds:
            try:
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                cache = decoder.filled(kind, kv, 1)
                decoder.decode(kind, cache, first, context, WARM_UP_STEPS)  # also checks that the backend runs
                bytes_per_row[kind.name] = held_bytes(cache)
                del cache
                if args.device.startswith("cuda"):
                    peaks[kind.name] = torch.cuda.max_memory_allocated()
                runnable.append(kind)
            except Exception as error:  # noqa: BLE001 (a backend that does not run here is a result, not a crash)
                logger.warning(f"{kind.name} does not run here: {error!r:.200}")
        measured: dict[str, tuple[dict[str, int], dict[str, float]]] = {}
        plans = (("batch1", args.batch1_contexts, lambda kind: 1, args.steps, args.rounds),
                 ("equal_batch", args.equal_batch_contexts if args.equal_batch else [], lambda kind: args.equal_batch,
                  args.budget_steps, args.budget_rounds),
                 ("budget", args.budget_contexts, lambda kind: max(1, min(
                     args.max_batch, args.budget_mib * 2**20 // bytes_per_row[kind.name])),
                  args.budget_steps, args.budget_rounds))
        for label, contexts, batch_of, steps, rounds in plans:
            if contexts is None or context in contexts:
                batches = {kind.name: batch_of(kind) for kind in runnable}
                measured[label] = batches, median_rates(decoder, runnable, kv, first, batches, steps, rounds)
        rows = [speed_row(args, decoder.model, kind, context, bytes_per_row[kind.name], peaks.get(kind.name),
                          measured, weights) for kind in runnable]
        for row in rows:
            logger.info(" | ".join(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
                                   for key, value in row.items() if value is not None))
        del kv
        yield rows


def speed_row(
    args: argparse.Namespace, model: PreTrainedModel, kind: CacheKind, context: int, bytes_per_row: int,
    peak: int | None, measured: dict[str, tuple[dict[str, int], dict[str, float]]], weights: int,
) -> dict[str, Any]:
    """One cache's figures at one context: per measurement its batch, tokens/s, ratio to FP and bandwidth share."""
    packed = None if kind.settings is None else limit_bytes_per_token(model, kind.settings)
    row: dict[str, Any] = {
        "context": context, "kv_cache": kind.name, "bytes_per_row": bytes_per_row,
        "bytes_per_token": bytes_per_row / (context + args.steps), "packed_bytes_per_token": packed,
        "held_over_packed": None if packed is None else bytes_per_row / (context + args.steps) / packed,
        "peak_bytes_batch1": peak,
    }
    fp = "FP (DynamicCache)"
    for label in ("batch1", "equal_batch", "budget"):
        batches, rates = measured.get(label, ({}, {}))
        rate, batch = rates.get(kind.name), batches.get(kind.name)
        row[f"{label}_batch"] = batch
        row[f"tokens_per_s_{label}"] = rate
        row[f"ratio_to_fp_{label}"] = None if rate is None or fp not in rates else rate / rates[fp]
        row[f"bandwidth_share_{label}"] = None if batch is None else bandwidth_share(
            rate, batch, bytes_per_row, weights, args
        )
    return row


def profile_batch1(args: argparse.Namespace, kinds: list[CacheKind]) -> str:
    """Where a batch-1 decode step spends its time (torch.profiler): FP cache against ours K4V2 packed, and with
    ``--compiled`` FP ``StaticCache`` against ours static, each compiled (those of them ``--rows`` keeps).

    Per row the step's wall time and the device's busy time (the sum of its kernels' durations, CUDA graph
    replays included): a step whose busy time is far below its wall time waits on the host, and then no kernel
    of the cache's makes it slower; top ops by host time, and on a GPU by device time.
    """
    decoder = Decoder(args, speed_model(args))
    context = args.profile_context
    kv, first = prefilled_kv(decoder.model, context, args)
    on_gpu = args.device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    packed = [kind for kind in kinds if kind.name.endswith("packed")]
    compiled = [kind for kind in kinds if kind.compiled]  # FP StaticCache, then ours static (first attention)
    sections = []
    for kind in [kinds[0], *packed[:1], *compiled[:2]]:
        decoder.rate(kind, kv, first, WARM_UP_STEPS)
        cache = decoder.filled(kind, kv, 1)
        with torch.profiler.profile(activities=activities) as profiler:
            rate = decoder.decode(kind, cache, first, context, args.steps)
        kernels = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(event.time_range.elapsed_us() for event in kernels) / args.steps
        sections += [f"### {kind.name}, context {context}: {rate:.1f} tok/s under the profiler, {args.steps} steps",
                     "", f"Step {1e6 / rate:.0f} us wall; device busy {busy:.0f} us a step in "
                     f"{len(kernels) / args.steps:.0f} kernels" if on_gpu else "", ""]
        orders = ("self_cpu_time_total", "self_device_time_total") if on_gpu else ("self_cpu_time_total",)
        for order in orders:
            table = profiler.key_averages().table(sort_by=order, row_limit=15, max_name_column_width=60)
            sections += [f"By {order}:", "", "```", table, "```", ""]
        if not kind.compiled:
            cache = decoder.filled(kind, kv, 1)
            sections += python_profile(lambda: decoder.decode(kind, cache, first, context, args.steps), args.steps)
    return "\n".join(sections)


#: the Python a step runs around the model's own layers: the caches, the attention functions, Triton's launcher
_HOST_PATHS = ("intactkv_modifier", "cache_utils", "sdpa_attention", "triton/runtime")


def python_profile(decode: Callable[[], float], steps: int) -> list[str]:
    """The cache's and attention's Python per step (cProfile's cumulative time): what an eager step's host
    time beyond FP's is spent on, where the torch.profiler tables show only the ops it ends in."""
    profiler = cProfile.Profile()
    profiler.enable()
    rate = decode()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = sorted(((cumulative, calls, f"{Path(file).name}:{line}({name})")
                   for (file, line, name), (_, calls, _, cumulative, _) in stats.items()
                   if any(part in file for part in _HOST_PATHS)), reverse=True)[:20]
    table = ["| function | calls a step | cumulative µs a step |", "|---|---|---|"]
    table += [f"| `{where}` | {calls / steps:.0f} | {cumulative * 1e6 / steps:.0f} |"
              for cumulative, calls, where in rows]
    return [f"Python under cProfile ({rate:.1f} tok/s, {1e6 / rate:.0f} us a step; cProfile slows every call, so "
            "compare rows, not totals), the cache's and attention's functions by cumulative time:", "", *table, ""]


# perplexity ----------------------------------------------------------------------------


def perplexity_rows(args: argparse.Namespace, kinds: list[CacheKind]) -> list[dict[str, Any]]:
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    args.prefix = measured_prefix(tokenizer)[0]
    windows = split_windows(args, tokenizer, "eval", args.windows)
    model = load_fp(args)
    model.set_attn_implementation(packed_implementation(model.config._attn_implementation))
    rows = []
    for kind in (kind for kind in kinds if not kind.compiled):  # a static cache reads as the dynamic one
        try:
            ppl, measured = cached_perplexity(model, windows, lambda kind=kind: kind.build(model, args.length), args)
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
        f"{result['budget_steps']} tokens, {result['budget_rounds']} round(s)); bandwidth limit: "
        f"{_optional(result['bandwidth_gbs'] or None, '.0f')} GB/s; Triton decode kernel "
        f"{'on' if result['decode_kernel'] else 'off'} and CPU decode loop (`cpu_kernel`) "
        f"{'on' if result['cpu_decode_loop'] else 'off'} for ours packed (torch ops where both are off); "
        f"ours static's kernel launch: {result.get('static_tuning') or 'defaults'}; "
        f"groups of {result['group_size']}, "
        f"residual {result['residual_length']} tokens for every quantized cache (transformers' quantizes keys and "
        f"values per channel groups along head_dim, axis 0).",
    ]
    for label, title in (("batch1", "batch 1"), ("equal_batch", "one batch for every cache"),
                         ("budget", f"the largest batch whose cache fits {result['budget_mib']} MiB")):
        rows = [r for r in result["speed"] if r[f"tokens_per_s_{label}"] is not None]
        if rows:
            lines += ["", f"## Decode tokens/s, {title}", "",
                      "| context | KV cache | batch | tok/s | × FP | share of the bandwidth limit | bytes/token held "
                      "| × packed size | peak MiB, batch 1 |", "|---|---|---|---|---|---|---|---|---|"]
            lines += [
                f"| {r['context']} | {r['kv_cache']} | {r[f'{label}_batch']} | {r[f'tokens_per_s_{label}']:.1f} | "
                f"{_optional(r[f'ratio_to_fp_{label}'], '.2f')} | {_optional(r[f'bandwidth_share_{label}'], '.1%')} | "
                f"{r['bytes_per_token']:.0f} | {_optional(r['held_over_packed'], '.3f')} | "
                f"{_optional(r['peak_bytes_batch1'] and r['peak_bytes_batch1'] / 2**20, '.0f')} |"
                for r in rows
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
    parser.add_argument("--budget-rounds", type=int, default=1, help="rounds of the budget and equal-batch runs")
    parser.add_argument("--batch1-contexts", type=int, nargs="*", help="contexts measured at batch 1 (default: all)")
    parser.add_argument("--budget-contexts", type=int, nargs="*", help="contexts measured in the budget (default: all)")
    parser.add_argument("--equal-batch", type=int, default=0, help="one batch for every cache (0: none)")
    parser.add_argument("--equal-batch-contexts", type=int, nargs="*", help="contexts of --equal-batch (default: all)")
    parser.add_argument("--compiled", action="store_true",
                        help="add FP StaticCache and ours K4V2 static, each with the forward compiled")
    parser.add_argument("--static-attention", default="fused", choices=sorted(STATIC_ATTENTIONS),
                        help="compile ours static with its decode attention (static_implementation), the plain "
                        "--attention, or both")
    parser.add_argument("--rows", nargs="+",
                        help="measure only the caches whose name holds one of these (FP DynamicCache always)")
    parser.add_argument("--static-tuning", nargs="+", default=[], metavar="KEY=VALUE",
                        help="launch settings of ours static's Triton kernel (static_kernel_attention's keywords, "
                        "e.g. tile=128 target_programs=256), for this run only")
    parser.add_argument("--bandwidth-gbs", type=float, default=0.0,
                        help="memory bandwidth (GB/s): every figure also as a share of the physical limit")
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

    kinds = selected_kinds(cache_kinds(args), args.rows)
    static_tuning = apply_static_tuning(args.static_tuning) if args.static_tuning else {}
    result: dict[str, Any] = {
        "device_name": (
            torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
        ),
        "machine": platform.platform(), "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg()[0], "dtype": str(args.dtype).removeprefix("torch."),
        "attention": args.attention, "seed": args.seed, "steps": args.steps, "rounds": args.rounds,
        "budget_mib": args.budget_mib, "budget_steps": args.budget_steps, "budget_rounds": args.budget_rounds,
        "equal_batch": args.equal_batch, "bandwidth_gbs": args.bandwidth_gbs,
        "group_size": args.group_size, "residual_length": args.residual_length,
        "speed_model": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
                        "intermediate": args.intermediate or 2 * args.hidden, "vocab": args.vocab},
        "model": args.model, "windows": args.windows,
        "windows_file": args.windows_file and str(args.windows_file), "length": args.length, "prefill": args.prefill,
        "chunk": args.chunk, "versions": versions(),
        "decode_kernel": kernel_available(torch.device(args.device)), "static_tuning": static_tuning,
        "cpu_decode_loop": args.device == "cpu" and cpu_kernel.built(),
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
