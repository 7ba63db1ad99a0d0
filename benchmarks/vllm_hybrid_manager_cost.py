"""What vLLM's hybrid KV-cache manager does to a sliding-window model's throughput, with the plugin and without.

Why: until the connector implemented vLLM's ``SupportsHMA``, configuring it made
vLLM turn its hybrid KV-cache manager off for sliding-window models such as
Gemma 3, the one engine setting the plugin changed; now the manager stays on
unless asked off. This runs, alternated over ``--rounds``, four engines on the
same prompts: plain vLLM and the plugin, each with the manager on (vLLM's
default) and off (``disable_hybrid_kv_cache_manager``), and reports decode
tokens/s, so the plugin's cost is measured at either setting and the manager's
own effect beside it.

    python benchmarks/vllm_hybrid_manager_cost.py --checkpoint outputs/gemma-3-270m-gptq-w4-intactkv \
        --windows-file .carry/gpu-run/gemma_windows.pt --serving-python .venv-serving/bin/python \
        --out benchmarks/results/cpu/gemma-3-270m/hybrid_manager
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from intactkv_modifier.checkpoint import read_config_block
from intactkv_modifier.eval.vllm_runs import EngineRun, ThroughputJob, cycled_prompts, run_engine
from intactkv_modifier.serving.matching import starts_with_prefix

#: engine name -> (plugin on, disable_hybrid_kv_cache_manager)
ENGINES = {
    "plain, hybrid manager on": (False, None),
    "plain, hybrid manager off": (False, True),
    "plugin, hybrid manager on": (True, None),
    "plugin, hybrid manager off": (True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="IntactKV checkpoint, sliding-window model")
    parser.add_argument("--windows-file", type=Path, required=True, help="saved windows (they start with the prefix)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="throughput measurements inside each engine")
    parser.add_argument("--rounds", type=int, default=2, help="each engine once per round, the order rotated")
    parser.add_argument("--cuda-graphs", action="store_true", help="GPU: keep vLLM's CUDA graphs (default eager)")
    parser.add_argument("--gpu-memory-utilization", type=float, help="vLLM's share of the GPU (default vLLM's)")
    parser.add_argument("--serving-python", type=Path, default=None, help="vLLM's interpreter (default: this one)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    windows = torch.load(args.windows_file)["eval"].tolist()  # make_windows.py's file
    prompts = cycled_prompts(windows, args.prompts, args.prompt_length)
    block = read_config_block(args.checkpoint)
    if block is None:
        raise SystemExit(f"{args.checkpoint} is not an IntactKV checkpoint (no intactkv_config in its config.json)")
    if not all(starts_with_prefix(prompt, block.prefix_token_ids) for prompt in prompts):
        raise SystemExit(f"the windows of {args.windows_file} do not all start with the checkpoint's prefix")
    python = args.serving_python or Path(sys.executable)
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")  # the same cores for every engine (vllm_serving.py)
    job = ThroughputJob(prompts=prompts, new_tokens=args.new_tokens, repeats=args.repeats)
    names = list(ENGINES)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            plugin, disable = ENGINES[name]
            run = EngineRun(
                model=str(args.checkpoint), plugin=plugin, max_model_len=args.prompt_length + args.new_tokens,
                enforce_eager=not args.cuda_graphs, gpu_memory_utilization=args.gpu_memory_utilization,
                disable_hybrid_kv_cache_manager=disable, jobs=[job],
            )  # fmt: skip
            rates[name].extend(run_engine(python, run).results[0])
            print(f"round {round_index}: {name}: {rates[name][-args.repeats :]}", flush=True)

    medians = {name: statistics.median(values) for name, values in rates.items()}
    base = medians[names[0]]
    result = {
        "checkpoint": str(args.checkpoint), "cpus": os.cpu_count(),
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.platform(),
        "prompts": len(prompts), "prompt_tokens": args.prompt_length, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "rounds": args.rounds, "eager": not args.cuda_graphs,
        "tokens_per_s": rates, "median": medians,
        "median_over_plain_manager_on": {name: median / base for name, median in medians.items()},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hybrid_manager.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"`{args.checkpoint.name}`, {len(prompts)} prompts of {args.prompt_length} tokens starting with the prefix, "
        f"{args.new_tokens} new tokens each; {args.rounds} rounds of the {len(names)} engines, order rotated, "
        f"{args.repeats} measurements in each engine.",
        "",
        "| engine | tokens/s (every measurement) | median | / plain, manager on |",
        "|---|---|---|---|",
        *(
            f"| {n} | {', '.join(f'{v:.1f}' for v in rates[n])} | {medians[n]:.1f} | {medians[n] / base:.3f} |"
            for n in names
        ),
    ]
    (args.out / "hybrid_manager.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
