"""Requests through a real vLLM engine, for the serving tests and benchmarks.

vLLM and llm-compressor pin different compressed-tensors releases, so they live
in two environments: the quantizing one builds checkpoints and the transformers
references, the serving one (``scripts/serving_setup.sh``) runs vLLM. This
module is both halves. :func:`run_engine` (any environment) starts
``python -m intactkv_modifier.eval.vllm_runs`` in the serving interpreter with
a JSON :class:`EngineRun` and returns its :class:`EngineAnswer`; the ``__main__``
half (serving environment) builds the engine, runs every job and prints the
answer. Prompts are token ids, so both sides see exactly the same tokens.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "EngineAnswer",
    "EngineRun",
    "FirstTokenJob",
    "GreedyJob",
    "PromptLogprobsJob",
    "ThroughputJob",
    "cycled_prompts",
    "prompt_perplexity",
    "prompt_token_logprobs",
    "run_engine",
]

TokenIds = list[int]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FirstTokenJob(_Frozen):
    """Top-``top`` log-probabilities of the first generated token; ``passes`` > 1 repeats the same requests
    (the later passes are served from vLLM's prefix cache)."""

    kind: Literal["first_token"] = "first_token"
    prompts: list[TokenIds]
    top: int = 5
    passes: int = 1


class PromptLogprobsJob(_Frozen):
    """The log-probability vLLM gives each prompt token (``None`` where it gives none): how evaluation reads it.

    ``read_prefix_cache`` sends ``skip_reading_prefix_cache=False``: vLLM (and the IntactKV connector) may then
    serve the leading positions from a cache, and those positions' values are not computed (vLLM leaves them out
    or unset; they read as ``None``, see ``prompt_token_logprobs``), so only positions after them may be counted.
    """

    kind: Literal["prompt_logprobs"] = "prompt_logprobs"
    prompts: list[TokenIds]
    read_prefix_cache: bool = False


class GreedyJob(_Frozen):
    """Greedy continuations, ``max_tokens`` each."""

    kind: Literal["greedy"] = "greedy"
    prompts: list[TokenIds]
    max_tokens: int = 16


class ThroughputJob(_Frozen):
    """Decode tokens per second: all prompts at once, ``new_tokens`` each (EOS ignored), ``repeats`` times."""

    kind: Literal["throughput"] = "throughput"
    prompts: list[TokenIds]
    new_tokens: int = 128
    repeats: int = 3


Job = Annotated[FirstTokenJob | PromptLogprobsJob | GreedyJob | ThroughputJob, Field(discriminator="kind")]


def cycled_prompts(rows: list[TokenIds], count: int, length: int, skip: int = 0) -> list[TokenIds]:
    """``count`` prompts of ``length`` tokens from ``rows`` (after ``skip`` tokens), cycling through the rows when
    there are fewer: a throughput job's load from a handful of held-out windows."""
    cycled = rows * -(-count // len(rows))
    return [row[skip : skip + length] for row in cycled[:count]]


class EngineRun(_Frozen):
    """One engine, its settings and the jobs it runs, in order."""

    model: str
    plugin: bool = True
    dtype: str = "bfloat16"
    max_model_len: int = 512
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 16
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    #: vLLM's default (None) or a named backend (``FLASH_ATTN``, ``TRITON_ATTN``, ``FLASHINFER``, ``FLEX_ATTENTION``).
    attention_backend: str | None = None
    #: CPU engines are always eager; on a GPU, False keeps vLLM's CUDA graphs.
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    #: Share of each GPU's memory vLLM takes (None: vLLM's default); unused on the CPU.
    gpu_memory_utilization: float | None = None
    #: Tokens per KV-cache block, the prefix cache's unit (None: the backend's default, 128 on vLLM-CPU).
    block_size: int | None = None
    #: vLLM's hybrid KV-cache manager (sliding-window models) off when True; None lets vLLM decide (on for them,
    #: the plugin's connector included, except under TurboQuant, where the plugin turns it off).
    disable_hybrid_kv_cache_manager: bool | None = None
    jobs: list[Job] = []


class EngineAnswer(_Frozen):
    """Per job: first_token -> [pass][prompt] {token: logprob}; prompt_logprobs -> [prompt][position];
    greedy -> [prompt] token ids; throughput -> [repeat] tokens per second."""

    load_seconds: float
    results: list[list]
    log: str = ""


def run_engine(python: str | os.PathLike[str], run: EngineRun, timeout: float = 900) -> EngineAnswer:
    """Run ``run`` with the serving interpreter ``python``; fail with the engine's own log when it fails."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default (4) is more than small models need
    # importing this package imports llm-compressor where it is installed, which touches CUDA: a forked engine
    # process could not use it again
    env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if not run.plugin:
        env["VLLM_PLUGINS"] = ""  # vLLM's allow-list: load no general plugin
    with tempfile.TemporaryDirectory() as folder:
        spec, answer = Path(folder) / "run.json", Path(folder) / "answer.json"
        spec.write_text(run.model_dump_json())
        result = subprocess.run(
            [str(python), "-m", __name__, str(spec), str(answer)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout,
        )
        if not answer.is_file():
            raise RuntimeError(f"the vLLM engine run failed (exit {result.returncode}):\n{result.stdout[-6000:]}")
        parsed = EngineAnswer.model_validate_json(answer.read_text())
    log = result.stdout
    if result.returncode != 0:
        # the answer is renamed into place only after every job ran, so this is vLLM's teardown (vLLM-CPU 0.32
        # sometimes aborts there: "terminate called without an active exception"): keep the answer, say so
        log += f"\n[run_engine] the engine process exited {result.returncode} after writing its complete answer\n"
        logger.warning(f"vLLM's engine process exited {result.returncode} after its answer was complete (teardown)")
    return parsed.model_copy(update={"log": log})


def _serve(run: EngineRun) -> EngineAnswer:
    """The serving half: needs vLLM."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.monotonic()
    optional = {
        "gpu_memory_utilization": run.gpu_memory_utilization,
        "block_size": run.block_size,
        "disable_hybrid_kv_cache_manager": run.disable_hybrid_kv_cache_manager,
    }
    llm = LLM(
        model=run.model,
        dtype=run.dtype,
        max_model_len=run.max_model_len,
        max_num_batched_tokens=run.max_num_batched_tokens,
        max_num_seqs=run.max_num_seqs,
        enable_prefix_caching=run.enable_prefix_caching,
        kv_cache_dtype=run.kv_cache_dtype,
        attention_backend=run.attention_backend,
        enforce_eager=run.enforce_eager,
        tensor_parallel_size=run.tensor_parallel_size,
        seed=0,
        skip_tokenizer_init=True,
        **{name: value for name, value in optional.items() if value is not None},
    )
    load_seconds = time.monotonic() - started

    def generate(prompts: list[TokenIds], params: SamplingParams) -> list:
        return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    results: list[list] = []
    for job in run.jobs:
        if isinstance(job, FirstTokenJob):
            params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=job.top, detokenize=False)
            results.append([_first_token_logprobs(generate(job.prompts, params)) for _ in range(job.passes)])
        elif isinstance(job, PromptLogprobsJob):
            reading = {"skip_reading_prefix_cache": False} if job.read_prefix_cache else {}
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False, **reading)
            outputs = generate(job.prompts, params)
            results.append([
                prompt_token_logprobs(prompt, out.prompt_logprobs, out.num_cached_tokens)
                for prompt, out in zip(job.prompts, outputs)
            ])  # fmt: skip
        elif isinstance(job, GreedyJob):
            params = SamplingParams(max_tokens=job.max_tokens, temperature=0.0, detokenize=False)
            results.append([list(out.outputs[0].token_ids) for out in generate(job.prompts, params)])
        else:
            params = SamplingParams(max_tokens=job.new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
            results.append([_tokens_per_second(lambda: generate(job.prompts, params)) for _ in range(job.repeats)])
    return EngineAnswer(load_seconds=load_seconds, results=results)


def _first_token_logprobs(outputs: list) -> list[dict[str, float]]:
    return [{str(token): entry.logprob for token, entry in out.outputs[0].logprobs[0].items()} for out in outputs]


def prompt_token_logprobs(prompt: TokenIds, entries: list, cached_tokens: int | None) -> list[float | None]:
    """Each prompt token's own log-probability, ``None`` where vLLM computed none.

    Positions up to ``cached_tokens`` (vLLM's ``num_cached_tokens``: served from the prefix cache or loaded by a
    KV connector, the IntactKV prefix among them) have no value: position p's needs the hidden state of p - 1.
    vLLM 0.26 (GPU) leaves those positions out of the list; vLLM-CPU 0.32 keeps them, filled from uninitialised
    memory (token ids like -1507910256). So entries are right-aligned to the prompt, the positions up to
    ``cached_tokens`` are dropped whatever they hold, and the rest are proven to line up: vLLM puts the prompt
    token's own log-probability into every entry it computes, and an entry without its position's token stops
    the run rather than be read as another position's value.
    """
    if cached_tokens is None:
        raise RuntimeError("vLLM did not say how many prompt tokens it served from a cache (num_cached_tokens)")
    if len(entries) > len(prompt):
        raise RuntimeError(f"vLLM returned {len(entries)} prompt log-probability entries for {len(prompt)} tokens")
    aligned = [None] * (len(prompt) - len(entries)) + list(entries)
    values: list[float | None] = [None] * min(cached_tokens + 1, len(prompt))
    for position in range(len(values), len(prompt)):
        token, entry = prompt[position], aligned[position]
        if entry is None or token not in entry:
            raise RuntimeError(
                f"vLLM's prompt log-probabilities do not line up with the prompt: position {position} (of "
                f"{len(prompt)}, {len(entries)} entries returned, {cached_tokens} tokens cached) has "
                f"{'no entry' if entry is None else 'no value'} for its token {token}"
            )
        values.append(entry[token].logprob)
    return values


def prompt_perplexity(prompt_logprobs: list[list[float | None]], count_from: int = 1) -> float:
    """exp of the mean negative log-probability of the tokens at positions ``>= count_from`` of every prompt
    (``PromptLogprobsJob``'s result); a missing or non-finite value there is an error that says where."""
    counted = [lp for row in prompt_logprobs for lp in row[count_from:]]
    if not counted:
        raise ValueError(f"no window is longer than {count_from} tokens")
    bad = [
        (window, position, lp)
        for window, row in enumerate(prompt_logprobs)
        for position, lp in enumerate(row[count_from:], start=count_from)
        if lp is None or not math.isfinite(lp)
    ]
    if bad:
        kinds = sorted({repr(lp) for _, _, lp in bad})
        raise ValueError(
            f"vLLM returned {len(bad)} unusable log-probabilities ({', '.join(kinds)}) at positions >= {count_from}, "
            f"in {len({w for w, _, _ in bad})} of {len(prompt_logprobs)} windows; first (window, position): "
            f"{[(w, p) for w, p, _ in bad[:8]]}"
        )
    return math.exp(-sum(counted) / len(counted))


def _tokens_per_second(generate: Callable[[], list]) -> float:
    started = time.perf_counter()
    outputs = generate()
    return sum(len(out.outputs[0].token_ids) for out in outputs) / (time.perf_counter() - started)


def main() -> None:
    spec, answer = map(Path, sys.argv[1:3])
    run = EngineRun.model_validate_json(spec.read_text())
    partial = answer.with_suffix(".partial")
    partial.write_text(_serve(run).model_dump_json())
    partial.rename(answer)  # whole or absent: run_engine trusts an answer that exists


if __name__ == "__main__":
    main()
