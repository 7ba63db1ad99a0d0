"""vLLM with the IntactKV plugin against transformers + IntactKV, on a real quantized checkpoint.

Quantizes ``--model`` with GPTQ W4A16 g128 + IntactKV (a scheme vLLM has
kernels for), saves the compressed-tensors checkpoint, and then, for the same
prompts (held-out windows of the project corpus, most starting with ``[BOS]``,
some not):

* transformers, reloaded checkpoint, with and without the intact prefix: the
  next-token log-probabilities at the end of each prompt (the references);
* vLLM with the plugin (as installed) and with it switched off
  (``VLLM_PLUGINS=""``), each in its own process: the same log-probabilities,
  then decode throughput.

Parity is the largest |Δ logprob| over each reference's top-k tokens. float16
by default: its rounding noise is 8x smaller than bfloat16's, so the
IntactKV/no-IntactKV difference of a W4 model stands out from it. Needs a GPU
and vLLM:

    python benchmarks/vllm_serving.py --out benchmarks/results/gpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer

import intactkv_modifier  # noqa: F401  (loading hook)
from intactkv_modifier import intact_kv_disabled
from intactkv_modifier.eval.corpus import load_corpus_text
from intactkv_modifier.eval.perplexity import token_windows
from intactkv_modifier.recipes import resolve_recipe

ROOT = Path(__file__).resolve().parents[1]

_VLLM_WORKER = r"""
import json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

spec = json.loads(sys.argv[1])
llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=0,
          gpu_memory_utilization=0.5, skip_tokenizer_init=True, tensor_parallel_size=spec["tensor_parallel_size"],
          enforce_eager=spec["enforce_eager"], disable_custom_all_reduce=spec["enforce_eager"])
prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=spec["top_k"], detokenize=False)
outputs = llm.generate(prompts, params, use_tqdm=False)
logprobs = [{str(t): lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in outputs]
decode = SamplingParams(max_tokens=spec["new_tokens"], temperature=0.0, ignore_eos=True, detokenize=False)
throughput = []
for _ in range(spec["repeats"]):
    started = time.perf_counter()
    done = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["throughput_prompts"]], decode, use_tqdm=False)
    seconds = time.perf_counter() - started
    throughput.append(sum(len(o.outputs[0].token_ids) for o in done) / seconds)
print("RESULT " + json.dumps({"logprobs": logprobs, "tokens_per_s": throughput}))
"""


def vllm_run(spec: dict, with_plugin: bool, log_path: Path) -> dict:
    """One vLLM process; its output goes to ``log_path`` as it runs, so a hang or crash can be read afterwards."""
    env = dict(os.environ)  # keeps the machine's NCCL settings
    if not with_plugin:
        env["VLLM_PLUGINS"] = ""  # vLLM's allow-list of general plugins: none
    with log_path.open("w") as log_file:
        returncode = subprocess.run(
            [sys.executable, "-c", _VLLM_WORKER, json.dumps(spec)], stdout=log_file, stderr=subprocess.STDOUT,
            env=env, timeout=900,
        ).returncode
    log = log_path.read_text(errors="replace")  # vLLM's engine process logs here too
    if returncode != 0:
        raise RuntimeError(f"vLLM worker failed (full log: {log_path}):\n{log[-6000:]}")
    line = next(row for row in log.splitlines() if row.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    out["connector_log"] = [row for row in log.splitlines() if "IntactKV" in row][-3:]
    return out


def reference_logprobs(model: torch.nn.Module, prompts: list[list[int]]) -> list[torch.Tensor]:
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        return [model(torch.tensor([p], device=device)).logits[0, -1].float().log_softmax(-1).cpu() for p in prompts]


def max_gap(got: list[dict], want: list[torch.Tensor], top_k: int) -> float:
    """Largest |Δ logprob| over the reference's top-k tokens (vLLM returns them as its own top-k)."""
    gaps = []
    for served, reference in zip(got, want):
        for token in reference.topk(top_k).indices.tolist():
            if str(token) in served:
                gaps.append(abs(served[str(token)] - float(reference[token])))
    return max(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "pivot-llama"))
    parser.add_argument("--recipe", default=str(resolve_recipe("gptq-w4a16")))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--throughput-prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per vLLM engine")
    parser.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs and no custom all-reduce (quicker start-up)"
    )
    parser.add_argument(
        "--first", default="plugin", choices=["plugin", "no plugin"], help="which vLLM process runs first"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "vllm-serving")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bos = [tokenizer.bos_token_id]
    calib = token_windows(tokenizer, load_corpus_text("calibration"), bos, 512, 128)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to("cuda").eval()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}),
        recipe=args.recipe,
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
    )
    checkpoint = args.work / "checkpoint"
    model.save_pretrained(checkpoint, save_compressed=True)
    tokenizer.save_pretrained(checkpoint)
    del model

    count = args.prompts + args.throughput_prompts
    windows = token_windows(tokenizer, load_corpus_text("eval"), bos, args.length, count)
    with_bos = windows[: args.prompts].tolist()
    without_bos = [row[1:] for row in with_bos[:4]]  # served exactly like plain vLLM, with and without the plugin
    prompts = with_bos + without_bos
    throughput_prompts = [row[: args.length // 2] for row in windows[args.prompts :].tolist()]

    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, args.dtype)).to("cuda").eval()
    intact = reference_logprobs(reloaded, prompts)
    with intact_kv_disabled(reloaded):
        plain = reference_logprobs(reloaded, prompts)
    del reloaded
    torch.cuda.empty_cache()

    spec = {
        "model": str(checkpoint), "dtype": args.dtype, "max_model_len": args.length + args.new_tokens,
        "prompts": prompts, "top_k": max(20, args.top_k), "throughput_prompts": throughput_prompts,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "tensor_parallel_size": args.tensor_parallel_size,
        "enforce_eager": args.enforce_eager,
    }
    order = ["plugin", "no plugin"] if args.first == "plugin" else ["no plugin", "plugin"]
    runs = {
        name: vllm_run(spec, with_plugin=name == "plugin", log_path=args.work / f"vllm_{name.replace(' ', '_')}.log")
        for name in order
    }

    n = args.prompts
    k = args.top_k
    result = {
        "model": args.model, "recipe": Path(args.recipe).name, "dtype": args.dtype, "prompts": n,
        "prompt_tokens": args.length, "device_name": torch.cuda.get_device_name(), "torch": torch.__version__,
        "tensor_parallel_size": args.tensor_parallel_size, "run_order": order, "enforce_eager": args.enforce_eager,
        "transformers_intactkv_vs_plain": max(
            float((a - b)[a.topk(k).indices].abs().max()) for a, b in zip(intact[:n], plain[:n])
        ),
        "parity": {
            name: {
                "bos_prompts_vs_transformers_intactkv": max_gap(run["logprobs"][:n], intact[:n], k),
                "bos_prompts_vs_transformers_plain": max_gap(run["logprobs"][:n], plain[:n], k),
                "prompts_without_bos_vs_transformers_plain": max_gap(run["logprobs"][n:], plain[n:], k),
            }
            for name, run in runs.items()
        },
        "throughput": {
            "prompts": len(throughput_prompts), "prompt_tokens": args.length // 2, "new_tokens": args.new_tokens,
            "tokens_per_s": {name: max(run["tokens_per_s"]) for name, run in runs.items()},
            "all_tokens_per_s": {name: run["tokens_per_s"] for name, run in runs.items()},
        },
        "connector_log": runs["plugin"]["connector_log"],
    }
    tps = result["throughput"]["tokens_per_s"]
    result["throughput"]["ratio_plugin_over_no_plugin"] = tps["plugin"] / tps["no plugin"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "vllm_serving" if args.tensor_parallel_size == 1 else f"vllm_serving_tp{args.tensor_parallel_size}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    p = result["parity"]
    table = (
        f"vLLM serving of `{Path(args.model).name}` quantized with `{result['recipe']}` (GPTQ W4A16 g128 + IntactKV), "
        f"{args.dtype}, {result['device_name']} x tensor parallel {args.tensor_parallel_size}, "
        f"torch {result['torch']}. "
        f"{n} held-out prompts of {args.length} tokens "
        f"starting with [BOS] and 4 without; max |Δ logprob| over the reference's top-{k} next tokens. "
        "In transformers, "
        f"IntactKV on vs off moves them by up to {result['transformers_intactkv_vs_plain']:.4f}.\n\n"
        "| vLLM | vs transformers + IntactKV ([BOS] prompts) | vs transformers plain ([BOS] prompts) "
        "| vs transformers plain (no [BOS]) | decode tokens/s |\n|---|---|---|---|---|\n"
        + "".join(
            f"| {name} | {p[name]['bos_prompts_vs_transformers_intactkv']:.4f} | "
            f"{p[name]['bos_prompts_vs_transformers_plain']:.4f} | "
            f"{p[name]['prompts_without_bos_vs_transformers_plain']:.4f} | {tps[name]:.0f} |\n"
            for name in runs
        )
        + f"\nThroughput ratio, plugin / no plugin: {result['throughput']['ratio_plugin_over_no_plugin']:.3f} "
        f"({len(throughput_prompts)} prompts of {args.length // 2} tokens, {args.new_tokens} new tokens each, "
        f"best of {args.repeats}; {' first, then '.join(order)}).\n"
    )
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
