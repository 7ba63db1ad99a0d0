"""The static cache's decode attention kernel alone, per launch tuning: time per call of one layer, on a GPU.

A decode step of the compiled static cache spends most of its attention time in
``static_kernel_attention`` (``kv_cache_speed.py --profile-context``). This times
one layer's call of it, both kernels, captured in a CUDA graph and replayed as the
compiled step replays it (``triton.testing.do_bench_cudagraph``), for every
tile, program target, warp count and exact tile given, at each context, and
beside it the full-precision attention the compiled ``StaticCache`` runs
(transformers' sdpa path: the KV heads repeated to the query heads, then sdpa
under the static mask). Every output is checked against sdpa over the step's
dequantized read. Buffers: one layer of ``StaticKeyFavoredQuantizedLayer``
K4V2 (groups of 32, residual 32, a 1-token prefix) filled from random states
(seed 0) to the context, then one decode step; query heads, KV heads and
head_dim of the 1B Llama shape by default.

    python benchmarks/static_kernel_sweep.py --out benchmarks/results/gpu/static-kernel-sweep

Writes ``static_kernel_sweep.json`` and ``static_kernel_sweep.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from transformers.integrations.sdpa_attention import repeat_kv

from intactkv_modifier.kv_quant import KVQuantSettings
from intactkv_modifier.kv_quant.fast_decode import static_kernel_decode
from intactkv_modifier.kv_quant.static_cache import StaticKeyFavoredQuantizedLayer
from intactkv_modifier.kv_quant.static_decode_kernel import EXACT_TILE, TARGET_PROGRAMS

#: A row's launch settings, in the order of the table's columns (``static_kernel_attention``'s keywords)
TUNING_KEYS = ("tile", "target_programs", "num_warps", "exact_tile")


def fastest_tuning(result: dict[str, Any], context: int) -> str:
    """The fastest launch at ``context`` as ``kv_cache_speed.py --static-tuning`` takes it (``KEY=VALUE ...``)."""
    rows = [row for row in result["rows"] if row["context"] == context and row["attention"].startswith("ours")]
    if not rows:
        raise SystemExit(f"no row of the static kernel at context {context}")
    best = min(rows, key=lambda row: row["us"])
    return " ".join(f"{key}={best[key]}" for key in TUNING_KEYS if key in best)


def filled_layer(args: argparse.Namespace, context: int) -> tuple[StaticKeyFavoredQuantizedLayer, dict[str, Any]]:
    """A layer holding ``context`` tokens after one decode step, and the attention inputs of that step."""
    settings = KVQuantSettings.from_bits(4, 2, group_size=args.group_size, residual_length=args.residual_length)
    slots = context + 16
    layer = StaticKeyFavoredQuantizedLayer(*settings.for_layer(0), args.residual_length, slots, args.prefix)
    generator = torch.Generator(device="cuda").manual_seed(args.seed)
    shape = (args.batch, args.kv_heads, context - 1, args.head_dim)
    states = torch.randn((2, *shape), generator=generator, device="cuda", dtype=torch.bfloat16)
    layer.update(states[0], states[1])
    new = torch.randn((2, args.batch, args.kv_heads, 1, args.head_dim), generator=generator, device="cuda",
                      dtype=torch.bfloat16)
    quantized = layer.quantized_tokens(layer.length)
    keys, values = layer.update(new[0], new[1])
    query = torch.randn((args.batch, args.heads, 1, args.head_dim), generator=generator, device="cuda",
                        dtype=torch.bfloat16)
    mask = (torch.arange(slots, device="cuda") < context).expand(args.batch, 1, 1, slots).contiguous()
    step = {"query": query, "quantized": quantized, "mask": mask, "keys": keys, "values": values,
            "scaling": args.head_dim**-0.5}
    return layer, step


def fp_attention(step: dict[str, Any], fp_keys: torch.Tensor, fp_values: torch.Tensor) -> torch.Tensor:
    """What the compiled ``StaticCache`` step runs per layer under sdpa: repeat the KV heads, then attend."""
    groups = step["query"].shape[1] // fp_keys.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        step["query"], repeat_kv(fp_keys, groups), repeat_kv(fp_values, groups), attn_mask=step["mask"],
        scale=step["scaling"],
    )


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    from triton.testing import do_bench_cudagraph

    rows = []
    for context in args.contexts:
        layer, step = filled_layer(args, context)
        reference = torch.nn.functional.scaled_dot_product_attention(
            step["query"].float(), step["keys"].float(), step["values"].float(), attn_mask=step["mask"],
            scale=step["scaling"], enable_gqa=True,
        ).transpose(1, 2)
        fp_keys, fp_values = step["keys"].contiguous(), step["values"].contiguous()  # an FP cache's buffers
        fp_ms = do_bench_cudagraph(lambda: fp_attention(step, fp_keys, fp_values), rep=args.rep_ms)
        rows.append({"context": context, "attention": "FP StaticCache (repeat_kv + sdpa)", "us": fp_ms * 1e3})
        logger.info(f"context {context}: FP {fp_ms * 1e3:.1f} us")
        grid = itertools.product(args.tiles, args.targets, args.warps, args.exact_tiles)
        tunings = [
            {"tile": tile, "target_programs": target, "num_warps": warps, "exact_tile": exact}
            for tile, target, warps, exact in grid
        ]
        for tuning in [None, *tunings]:  # None: the kernel's own defaults, whatever they are

            def call(tuning: dict[str, int] | None = tuning) -> torch.Tensor:
                return static_kernel_decode(step["query"], layer, step["quantized"], step["mask"], step["scaling"],
                                            None, tuning)

            output = call()
            error = ((output.float() - reference).abs().max() / reference.abs().max()).item()
            microseconds = do_bench_cudagraph(call, rep=args.rep_ms) * 1e3
            rows.append({"context": context, "attention": "ours static kernel", **(tuning or {}),
                         "us": microseconds, "relative_error": error, "defaults": tuning is None})
            logger.info(f"context {context} {tuning or 'defaults'}: {microseconds:.1f} us, relative error {error:.2e}")
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['device_name']}; torch {result['torch']}, Triton {result['triton']}; batch {result['batch']}, "
             f"{result['heads']} query heads on {result['kv_heads']} KV heads, head_dim {result['head_dim']}, bf16, "
             f"K4V2 groups of {result['group_size']}, residual {result['residual_length']}, prefix "
             f"{result['prefix']}; seed {result['seed']}. Time of one layer's attention call (CUDA graph replay, "
             "mean of do_bench_cudagraph's replays); error relative to the largest output of sdpa over the step's "
             "read.",
             "", "| context | attention | tile | target programs | warps | exact tile | µs | × FP | rel. error |",
             "|---|---|---|---|---|---|---|---|---|"]
    fp = {row["context"]: row["us"] for row in result["rows"] if row["attention"].startswith("FP")}
    for row in sorted(result["rows"], key=lambda row: (row["context"], row["us"])):
        tuning = [str(row.get(key, "–")) for key in TUNING_KEYS]
        error = f"{row['relative_error']:.1e}" if "relative_error" in row else "–"
        name = row["attention"] + (" (defaults)" if row.get("defaults") else "")
        lines.append(f"| {row['context']} | {name} | {' | '.join(tuning)} | {row['us']:.1f} | "
                     f"{fp[row['context']] / row['us']:.2f} | {error} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--tiles", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--targets", type=int, nargs="+", default=[264, TARGET_PROGRAMS, 1056, 2112])
    parser.add_argument("--warps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--exact-tiles", type=int, nargs="+", default=[EXACT_TILE])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--residual-length", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=1)
    parser.add_argument("--rep-ms", type=int, default=200, help="time each call this long (do_bench_cudagraph)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu/static-kernel-sweep"))
    parser.add_argument("--fastest", type=int, metavar="CONTEXT",
                        help="print only the fastest launch at CONTEXT of the sweep already in --out, as "
                        "kv_cache_speed.py's --static-tuning takes it (the defaults print nothing)")
    args = parser.parse_args()
    if args.fastest:
        print(fastest_tuning(json.loads((args.out / "static_kernel_sweep.json").read_text()), args.fastest))
        return
    if not torch.cuda.is_available():
        raise SystemExit("the sweep times the Triton kernel on a CUDA device; none is here")
    import triton

    result: dict[str, Any] = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "triton": triton.__version__, **{k: v for k, v in vars(args).items() if k != "out"}}
    result["rows"] = sweep(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "static_kernel_sweep.json").write_text(json.dumps(result, indent=1))
    (args.out / "static_kernel_sweep.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
