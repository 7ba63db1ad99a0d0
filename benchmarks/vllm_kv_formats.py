"""vLLM's quantized KV-cache formats with and without the IntactKV plugin: perplexity and greedy agreement.

For one IntactKV checkpoint and held-out windows that start with its prefix,
one vLLM engine per (``--kv-cache-dtype``, plugin on / ``VLLM_PLUGINS=""``):

* **perplexity** from vLLM's prompt log-probabilities, counted over the tokens
  at positions ``>= --count-from`` of every window (default: the chunk size
  plus one, see below), the same positions in every run;
* **greedy agreement**: the first ``--new-tokens`` greedy tokens after the
  first ``--prompt-length`` tokens of ``--prompts`` windows, compared with the
  ``auto`` plugin-off run (plain vLLM, unquantized cache) and the ``auto``
  plugin-on run (IntactKV, unquantized cache): the share of prompts whose
  continuation is identical, and the mean count of leading tokens that agree.

Why positions are counted from the chunk on. TurboQuant's attention computes
a request's *first* prefill chunk from the step's own keys and values, not
from the cache, so without chunking a prompt's log-probabilities would never
see the KV format. Every engine here runs chunked prefill with
``max_num_batched_tokens = --chunk`` (default 64, below TurboQuant's 128-token
threshold, so continuation chunks read everything from the quantized cache),
and only tokens whose query sits in a later chunk are counted. With the plugin
on, a request for prompt log-probabilities must read the prefix cache
(``skip_reading_prefix_cache=False``: the plugin refuses the default under
TurboQuant, see docs/serving.md); its prefix is then loaded, so every chunk of
it reads the cache. The plugin-off runs send the same setting, so the two
differ only in the prefix K/V.

Each engine's answer is saved as ``--out/engines/<format>_<on|off>.json`` as
soon as it returns, and existing ones are reused: run subsets (``--formats``,
``--plugin``) in separate commands, then any run (``--formats`` of none
missing) writes ``kv_formats.{json,md}`` from all saved answers:

    python benchmarks/vllm_kv_formats.py --checkpoint CKPT --out OUT --formats auto turboquant_k8v4 --plugin on off
    python benchmarks/vllm_kv_formats.py --checkpoint CKPT --out OUT --formats turboquant_k3v4_nc turboquant_4bit_nc
    python benchmarks/vllm_kv_formats.py --checkpoint CKPT --out OUT --formats int4_per_token_head

A format the plugin refuses (it stops vLLM at start) is recorded as refused,
with vLLM's message, for the plugin-on side; an engine vLLM itself refuses (its
TurboQuant backend takes no sliding-window model, Gemma 3) or whose answer
cannot be counted is recorded as failed, with the reason, and the other rows stand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from intactkv_modifier.checkpoint import read_config_block
from intactkv_modifier.eval.corpus import load_corpus_text
from intactkv_modifier.eval.perplexity import saved_windows, token_windows
from intactkv_modifier.eval.vllm_runs import EngineRun, GreedyJob, PromptLogprobsJob, prompt_perplexity, run_engine

FORMATS = ("auto", "turboquant_k8v4", "turboquant_k3v4_nc", "turboquant_4bit_nc", "int4_per_token_head")
SIDES = {"on": True, "off": False}


def agreement(got: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """Share of identical continuations, and the mean number of leading tokens that agree."""
    leading = []
    for a, b in zip(got, reference, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        leading.append(same)
    return {
        "identical": sum(a == b for a, b in zip(got, reference)) / len(got),
        "mean_leading_tokens": sum(leading) / len(leading),
    }


def run_one(args: argparse.Namespace, fmt: str, side: str, windows: list[list[int]], prompts: list[list[int]]) -> dict:
    run = EngineRun(
        model=str(args.checkpoint), plugin=SIDES[side], dtype=args.dtype, kv_cache_dtype=fmt,
        max_model_len=max(len(windows[0]), args.prompt_length + args.new_tokens) + 1,
        max_num_batched_tokens=args.chunk, max_num_seqs=min(16, args.chunk),
        tensor_parallel_size=args.tensor_parallel_size, enforce_eager=not args.cuda_graphs,
        gpu_memory_utilization=args.gpu_memory_utilization,
        jobs=[
            PromptLogprobsJob(prompts=windows, read_prefix_cache=True),
            GreedyJob(prompts=prompts, max_tokens=args.new_tokens),
        ],
    )  # fmt: skip
    try:
        answer = run_engine(args.serving_python or Path(sys.executable), run, timeout=args.timeout)
    except RuntimeError as error:
        lines = str(error).splitlines()
        if side == "on" and "IntactKV" in str(error) and "--kv-cache-dtype" in str(error):
            return {"refused": next(line for line in lines if "--kv-cache-dtype" in line).strip()}
        # vLLM itself refusing the format for this model (e.g. TurboQuant and sliding windows) or failing
        return {"failed": next((line for line in reversed(lines) if "Error:" in line), lines[-1]).strip()}
    try:
        perplexity = prompt_perplexity(answer.results[0], args.count_from)
    except ValueError as error:  # kept whole, to tell a wrong prefix from vLLM's own gaps
        return {"failed": str(error), "prompt_logprobs": answer.results[0], "greedy": answer.results[1]}
    return {
        "load_seconds": answer.load_seconds,
        "perplexity": perplexity,
        "greedy": answer.results[1],
        "intactkv_log": [line for line in answer.log.splitlines() if "IntactKV" in line][:3],
    }


def report(args: argparse.Namespace, engines: dict[str, dict], windows: list[list[int]], prefix: list[int]) -> dict:
    reference = {side: engines.get(f"auto_{side}", {}).get("greedy") for side in SIDES}
    rows = {}
    for name, engine in sorted(engines.items()):
        row = {key: engine[key] for key in ("refused", "failed", "perplexity", "load_seconds") if key in engine}
        for side, greedy in reference.items():
            if "greedy" in engine and greedy is not None:
                row[f"greedy_vs_auto_plugin_{side}"] = agreement(engine["greedy"], greedy)
        rows[name] = row
    return {
        "checkpoint": str(args.checkpoint), "prefix_tokens": len(prefix), "windows": len(windows),
        "window_length": len(windows[0]), "dtype": args.dtype, "chunk_tokens": args.chunk,
        "counted_positions": f"tokens at positions >= {args.count_from} of every window (queries in a later "
        f"prefill chunk than the first, whose attention reads the KV cache under every format)",
        "prompt_logprobs_request": "skip_reading_prefix_cache=False (plugin on: the prefix is loaded)",
        "greedy": {
            "prompts": min(args.prompts, len(windows)), "prompt_tokens": args.prompt_length,
            "new_tokens": args.new_tokens,
        },
        "engines": rows,
    }  # fmt: skip


def markdown(result: dict) -> str:
    head = (
        f"Checkpoint `{Path(result['checkpoint']).name}` ({result['prefix_tokens']}-token intact prefix), vLLM in "
        f"{result['dtype']}, chunked prefill of {result['chunk_tokens']} tokens. Perplexity over "
        f"{result['windows']} windows of {result['window_length']} tokens, {result['counted_positions']}. "
        f"Greedy: {result['greedy']['new_tokens']} tokens after {result['greedy']['prompt_tokens']} prompt tokens, "
        f"{result['greedy']['prompts']} prompts; identical share / mean agreeing leading tokens.\n\n"
        "| kv_cache_dtype | plugin | perplexity | greedy vs auto, plugin off | greedy vs auto, plugin on |\n"
        "|---|---|---|---|---|\n"
    )
    lines = []
    for name, row in result["engines"].items():
        fmt, side = name.rsplit("_", 1)
        if "refused" in row or "failed" in row:
            verdict = f"refused by the plugin: {row['refused']}" if "refused" in row else f"failed: {row['failed']}"
            lines.append(f"| {fmt} | {side} | {verdict} | | |\n")
            continue
        cells = [
            f"{g['identical']:.2f} / {g['mean_leading_tokens']:.1f}" if (g := row.get(f"greedy_vs_auto_plugin_{s}"))
            else "n/a"
            for s in ("off", "on")
        ]
        lines.append(f"| {fmt} | {side} | {row['perplexity']:.3f} | {cells[0]} | {cells[1]} |\n")
    return head + "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="an IntactKV checkpoint folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), help=f"kv_cache_dtype values ({FORMATS})")
    parser.add_argument("--plugin", nargs="+", default=["on", "off"], choices=list(SIDES))
    parser.add_argument("--windows-file", type=Path, help="saved windows (the transformers tables'), else the corpus")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=64, help="max_num_batched_tokens: the prefill chunk")
    parser.add_argument("--count-from", type=int, default=None, help="first counted position (default chunk + 1)")
    parser.add_argument("--prompts", type=int, default=16, help="greedy prompts (window beginnings)")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--cuda-graphs", action="store_true", help="keep vLLM's CUDA graphs (default eager)")
    parser.add_argument("--serving-python", type=Path, default=None, help="vLLM's interpreter (default: this one)")
    parser.add_argument("--timeout", type=float, default=540, help="seconds per engine")
    args = parser.parse_args()
    args.count_from = args.chunk + 1 if args.count_from is None else args.count_from

    block = read_config_block(args.checkpoint)
    if block is None:
        raise SystemExit(f"{args.checkpoint} is not an IntactKV checkpoint (no intactkv_config in its config.json)")
    prefix = block.prefix_token_ids
    if args.count_from <= len(prefix):
        raise SystemExit(f"--count-from {args.count_from} counts positions inside the {len(prefix)}-token prefix")
    if args.windows_file is not None:
        windows = saved_windows(args.windows_file, "eval", args.windows)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
        windows = token_windows(tokenizer, load_corpus_text("eval"), prefix, args.length, args.windows)
    rows = windows.tolist()
    if any(row[: len(prefix)] != prefix for row in rows):
        raise SystemExit("the evaluation windows do not start with the checkpoint's prefix")
    prompts = [row[: args.prompt_length] for row in rows[: args.prompts]]

    saved = args.out / "engines"
    saved.mkdir(parents=True, exist_ok=True)
    for fmt in args.formats:
        for side in args.plugin:
            path = saved / f"{fmt}_{side}.json"
            if not path.is_file():
                print(f"engine: --kv-cache-dtype {fmt}, plugin {side}", flush=True)
                path.write_text(json.dumps(run_one(args, fmt, side, rows, prompts)) + "\n")
    engines = {path.stem: json.loads(path.read_text()) for path in sorted(saved.glob("*.json"))}
    result = report(args, engines, rows, prefix)
    (args.out / "kv_formats.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "kv_formats.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
