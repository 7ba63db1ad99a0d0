"""Reliability benchmark: concurrent generation, faults injected into saves, corrupted checkpoints.

Three counts that must be 0 (or all-equal), measured rather than asserted:

1. **Threads.** A tiny random Llama (hidden 128, 2 layers) quantized here with GPTQ W4A16
   g128 + IntactKV (calibration on random token ids: the point is that the weights differ
   from FP, not their quality; a real model's GPTQ takes minutes on this CPU), then
   ``--prompts`` prompts, half starting with [BOS], plus one [BOS] prompt run under
   ``intact_kv_disabled``, each generated greedily by its own thread, ``--rounds`` times;
   every generation is compared with the serial one.
2. **Faults in save.** A checkpoint of tiny random Llama A in a folder; tiny Llama B (same
   shape, other weights and prefix) is saved over it and the save is broken: an exception
   at each write step (half a file written where a file is written), and ``--kill-trials``
   SIGKILLs of a forked saving process at uniformly random times within the save. Each
   folder is then loaded with ``from_pretrained``: it must either refuse, or load A's
   weights with A's prefix, or B's with B's; anything else "loads wrong".
3. **Corrupted inputs.** B's good checkpoint, with its side file truncated at several
   points, ``--flip-trials`` single-bit flips, block fields edited, side files swapped
   with A's, or the side file deleted: each variant must be refused by ``from_pretrained``.

    python benchmarks/reliability.py --out benchmarks/results/cpu

Writes ``reliability.json`` and ``reliability.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from loguru import logger
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

import intactkv_modifier.checkpoint.folder as checkpoint_folder
import intactkv_modifier.storage as storage
from intactkv_modifier import (
    CONFIG_KEY,
    IntactKVModifier,
    PrefixKV,
    attach_intact_kv,
    capture_prefix_kv,
    intact_kv_disabled,
    prefix_kv_of,
)
from intactkv_modifier.checkpoint import SIDE_FILE_PATH

BOS = 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--calibration-samples", type=int, default=4)
    parser.add_argument("--kill-trials", type=int, default=40)
    parser.add_argument("--flip-trials", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    return parser.parse_args()


# 1. threads ---------------------------------------------------------------------------------------------


def quantized_model(args: argparse.Namespace, folder: Path) -> PreTrainedModel:
    """Saved first: llm-compressor reads the model's folder (its config, its tokenizer)."""
    torch.manual_seed(args.seed)
    LlamaForCausalLM(llama_config(hidden_size=128)).save_pretrained(folder)
    tokenizer = word_tokenizer(256)
    tokenizer.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(4, model.config.vocab_size, (args.calibration_samples, 128), generator=generator)
    ids[:, 0] = BOS
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}),
        recipe=[
            GPTQModifier(scheme="W4A16", targets="Linear", ignore=["lm_head"]),
            IntactKVModifier(prefix_token_ids=[BOS]),
        ],
        num_calibration_samples=args.calibration_samples,
        max_seq_length=128,
    )
    return model.eval()


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """llm-compressor wants a processor with a dataset; the dataset is already token ids, so any will do."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="w1", eos_token="w2", pad_token="w0")


def threaded_generation(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    with _quiet("llmcompressor"), tempfile.TemporaryDirectory() as folder:
        model = quantized_model(args, Path(folder))
    quantize_s = time.perf_counter() - start
    # Random weights have no attention sink, so the captured prefix barely moves a greedy continuation; a
    # shifted one does, and a thread that lost (or wrongly got) the prefix then shows in its tokens.
    prefix = prefix_kv_of(model)
    shifted = PrefixKV(keys=prefix.keys, values=[v + 2.0 * torch.randn_like(v) for v in prefix.values])
    attach_intact_kv(model, [BOS], shifted)
    generator = torch.Generator().manual_seed(args.seed + 1)
    vocab = model.config.vocab_size
    bodies = [torch.randint(4, vocab, (12,), generator=generator).tolist() for _ in range(args.prompts)]
    prompts = [[BOS, *body] if index % 2 == 0 else body for index, body in enumerate(bodies)]
    jobs = [(prompt, False) for prompt in prompts] + [(prompts[0], True)]

    def generate(job: tuple[list[int], bool]) -> list[int]:
        prompt, disabled = job
        with intact_kv_disabled(model) if disabled else contextlib.nullcontext(), torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0
            )
        return out[0, len(prompt) :].tolist()

    serial = [generate(job) for job in jobs]
    with intact_kv_disabled(model):
        plain = [generate(job) for job in jobs]
    changed = sum(a != b for a, b, (prompt, disabled) in zip(serial, plain, jobs) if prompt[0] == BOS and not disabled)
    start = time.perf_counter()
    equal = total = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for _ in range(args.rounds):
            for got, want in zip(pool.map(generate, jobs), serial):
                equal += got == want
                total += 1
    return {
        "model": "tiny random Llama (hidden 128, 2 layers, 4 heads, 2 KV heads, vocabulary 256)",
        "weights": "GPTQ W4A16 g128 (llm-compressor) + IntactKV [BOS]",
        "threads": len(jobs),
        "prompts_with_bos": sum(p[0] == BOS for p in prompts),
        "prompts_without_bos": sum(p[0] != BOS for p in prompts),
        "disabled_jobs": 1,
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "bos_prompts_changed_by_intactkv": changed,
        "generations": total,
        "equal_to_serial": equal,
        "quantize_s": round(quantize_s, 1),
        "threaded_s": round(time.perf_counter() - start, 1),
    }


# tiny checkpoints for 2 and 3 ---------------------------------------------------------------------------


def llama_config(hidden_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=BOS, eos_token_id=2,
        pad_token_id=0,
    )


def tiny_llama(seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(hidden_size=64)).eval()
    attach_intact_kv(model, [BOS], capture_prefix_kv(model, [BOS]))
    return model


def fingerprint(model: PreTrainedModel) -> tuple[torch.Tensor, list[torch.Tensor]]:
    prefix = prefix_kv_of(model)
    return model.model.embed_tokens.weight.detach().clone(), [t.detach().clone() for t in prefix.keys + prefix.values]


def outcome(folder: Path, a: tuple, b: tuple) -> str:
    """``refused``, ``A`` or ``B`` (weights and prefix of one model), or ``wrong``."""
    try:
        with _quiet("intactkv_modifier"):
            loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception:  # noqa: BLE001 (any refusal counts; the point is that none loads wrong)
        return "refused"
    weights, prefix = fingerprint(loaded)
    for name, (want_weights, want_prefix) in (("A", a), ("B", b)):
        if torch.equal(weights, want_weights) and all(torch.equal(x, y) for x, y in zip(prefix, want_prefix)):
            return name
    return "wrong"


@contextlib.contextmanager
def _quiet(package: str) -> Iterator[None]:
    """Refusals, and llm-compressor's progress, are expected here; keep the log readable."""
    logger.disable(package)
    try:
        yield
    finally:
        logger.enable(package)


# 2. faults in save --------------------------------------------------------------------------------------


class InjectedFault(Exception):
    pass


def _half_then_raise(original: Callable[..., None], target: Path) -> Callable[..., None]:
    """``write_atomically`` that, for ``target``, leaves half the bytes at the final name and raises."""

    def write(path: Path, data: bytes) -> None:
        if path == target:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[: len(data) // 2])
            raise InjectedFault(f"half of {path.name}")
        original(path, data)

    return write


def save_faults(model_b: PreTrainedModel, template: Path, work: Path, a: tuple, b: tuple) -> list[dict[str, Any]]:
    import transformers.modeling_utils as modeling_utils

    def weights_half(tensors: dict[str, torch.Tensor], filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\0" * 64)
        raise InjectedFault("half of the weights")

    def forget_fails(directory: Path) -> None:
        raise InjectedFault("removing the old side file")

    write = checkpoint_folder.write_atomically
    steps: list[tuple[str, Any, str, Any]] = [
        ("removing the old side file", storage, "forget_prefix", forget_fails),
        ("weights (after config.json)", modeling_utils, "safe_save_file", weights_half),
        ("side file, half written", checkpoint_folder, "write_atomically", "side"),
        ("sealed config block, half written", checkpoint_folder, "write_atomically", "config"),
    ]
    rows = []
    for step, module, name, fault in steps:
        target = work / "fault"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(template, target)
        if fault in ("side", "config"):
            fault = _half_then_raise(write, target / (SIDE_FILE_PATH if fault == "side" else "config.json"))
        original = getattr(module, name)
        setattr(module, name, fault)
        try:
            model_b.save_pretrained(target)
            raised = False
        except InjectedFault:
            raised = True
        finally:
            setattr(module, name, original)
        rows.append({"step": step, "save_raised": raised, "outcome": outcome(target, a, b)})
    return rows


def _save_in_child(model: PreTrainedModel, folder: str, started: Any) -> None:
    """Says "started" through a pipe: a lock-based Event held by a killed child would block the parent for ever."""
    started.send_bytes(b"started")
    model.save_pretrained(folder)
    started.send_bytes(b"saved")


def kill_trials(
    model_b: PreTrainedModel, template: Path, work: Path, a: tuple, b: tuple, trials: int, seed: int
) -> dict[str, Any]:
    """SIGKILL a forked process saving B over A at a uniformly random time up to 1.2x a save's duration.

    The duration is that of the same save run to completion in a forked child, between its "started" and "saved"
    signals (the child's exit, which takes longer than the save, is not part of it).
    """
    context = multiprocessing.get_context("fork")

    def save_over_a(kill_after: float | None) -> tuple[str, float]:
        target = work / "killed"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(template, target)
        reader, writer = context.Pipe(duplex=False)
        child = context.Process(target=_save_in_child, args=(model_b, str(target), writer))
        child.start()
        if reader.poll(30):
            reader.recv_bytes()
        start = time.perf_counter()
        if kill_after is None:
            reader.recv_bytes()
            duration = time.perf_counter() - start
        else:
            time.sleep(kill_after)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            duration = kill_after
        child.join()
        return outcome(target, a, b), duration

    uninterrupted, save_s = save_over_a(None)
    assert uninterrupted == "B", "an uninterrupted save must load"
    rng = random.Random(seed)
    outcomes = Counter(save_over_a(rng.uniform(0.0, 1.2 * save_s))[0] for _ in range(trials))
    return {"trials": trials, "save_s": round(save_s, 3), "outcomes": dict(outcomes)}


# 3. corrupted inputs ------------------------------------------------------------------------------------


def corruptions(good: Path, other: Path, flips: int, seed: int) -> Iterator[tuple[str, str, Callable[[Path], None]]]:
    """(kind, name, edit of a copy of ``good``)."""
    data = (good / SIDE_FILE_PATH).read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for cut in sorted({0, 4, 8, header_end // 2, header_end, (header_end + len(data)) // 2, len(data) - 1}):
        yield "truncated side file", f"cut at byte {cut}", lambda f, c=cut: (f / SIDE_FILE_PATH).write_bytes(data[:c])
    rng = random.Random(seed)
    for _ in range(flips):
        bit = rng.randrange(len(data) * 8)

        def flip(folder: Path, bit: int = bit) -> None:
            flipped = bytearray(data)
            flipped[bit // 8] ^= 1 << (bit % 8)
            (folder / SIDE_FILE_PATH).write_bytes(bytes(flipped))

        yield "bit-flipped side file", f"bit {bit}", flip
    block = json.loads((good / "config.json").read_text())[CONFIG_KEY]
    edits = {
        "prefix_token_ids": [BOS, 5], "num_layers": block["num_layers"] + 1, "dtype": "float16",
        "num_key_value_heads": 2 * block["num_key_value_heads"], "head_dim": block["head_dim"] // 2,
        "format_version": 1, "side_file_sha256": "0" * 64,
    }
    for field, value in edits.items():
        yield "edited block", f"{field} = {value}", lambda f, e={field: value}: _edit_block(f, lambda b: b.update(e))
    yield "edited block", "side_file_sha256 removed", lambda f: _edit_block(f, lambda b: b.pop("side_file_sha256"))
    swap = other / SIDE_FILE_PATH
    yield "swapped side file", "the other checkpoint's", lambda f: shutil.copyfile(swap, f / SIDE_FILE_PATH)
    yield "missing side file", "deleted", lambda f: (f / SIDE_FILE_PATH).unlink()


def _edit_block(folder: Path, edit: Callable[[dict], Any]) -> None:
    document = json.loads((folder / "config.json").read_text())
    edit(document[CONFIG_KEY])
    (folder / "config.json").write_text(json.dumps(document))


def corrupted_inputs(good: Path, other: Path, work: Path, a: tuple, b: tuple, args: argparse.Namespace) -> dict:
    assert outcome(good, a, b) == "B", "the unedited checkpoint must load"
    by_kind: dict[str, Counter[str]] = {}
    for kind, _, edit in corruptions(good, other, args.flip_trials, args.seed):
        target = work / "corrupt"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(good, target)
        edit(target)
        result = outcome(target, a, b)
        by_kind.setdefault(kind, Counter())["refused" if result == "refused" else "accepted"] += 1
    return {kind: dict(counts) for kind, counts in by_kind.items()}


# report -------------------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    threads = result["threads"]
    lines = [
        "# Reliability (`benchmarks/reliability.py`)",
        "",
        f"{result['device']}, {result['machine']}, torch {result['torch']}; load average at start "
        f"{result['load_average_start']:.2f} (shared machine). Total {result['total_s']:.0f} s.",
        "",
        "## Threads sharing one model",
        "",
        f"{threads['model']}, {threads['weights']}: {threads['threads']} threads ({threads['prompts_with_bos']} "
        f"prompts with [BOS], {threads['prompts_without_bos']} without, {threads['disabled_jobs']} under "
        f"`intact_kv_disabled`), greedy, {threads['new_tokens']} new tokens, {threads['rounds']} rounds.",
        "",
        f"**{threads['equal_to_serial']} of {threads['generations']}** threaded generations equal the serial ones "
        f"(the stored prefix, shifted so that it matters on random weights, changes the greedy continuation of "
        f"{threads['bos_prompts_changed_by_intactkv']} of {threads['prompts_with_bos']} [BOS] prompts).",
        "",
        "## Faults injected into a save of B over A's checkpoint",
        "",
        "| fault | save raised | folder then |",
        "|---|---|---|",
    ]
    lines += [f"| exception: {r['step']} | {r['save_raised']} | {r['outcome']} |" for r in result["save_faults"]]
    kills = result["kill_trials"]
    outcomes = ", ".join(f"{name} {count}" for name, count in sorted(kills["outcomes"].items()))
    lines += [
        f"| SIGKILL at a random time (x{kills['trials']}, save takes {kills['save_s']} s) | killed | {outcomes} |",
        "",
        "`A` / `B`: loads that model's weights with its own prefix; `refused`: from_pretrained raises; "
        f"`wrong`: anything else. **Folders that load wrong: {result['loads_wrong']}.**",
        "",
        "## Corrupted checkpoints",
        "",
        "| corruption | tried | refused | accepted |",
        "|---|---|---|---|",
    ]
    for kind, counts in result["corruptions"].items():
        tried = sum(counts.values())
        lines.append(f"| {kind} | {tried} | {counts.get('refused', 0)} | {counts.get('accepted', 0)} |")
    lines += ["", f"**Accepted silently: {result['accepted_silently']}.**", ""]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": platform.processor() or "CPU",
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg()[0],
        "seed": args.seed,
    }
    result["threads"] = threaded_generation(args)
    # tqdm guards its bars with a lock shared with forked children; a child killed inside a bar would hold it
    # for ever and block this process's next bar, so the saves and loads below run without progress bars.
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model_a, model_b = tiny_llama(args.seed), tiny_llama(args.seed + 1)
        a, b = fingerprint(model_a), fingerprint(model_b)
        model_a.save_pretrained(work / "A")
        model_b.save_pretrained(work / "B")
        result["save_faults"] = save_faults(model_b, work / "A", work, a, b)
        result["kill_trials"] = kill_trials(model_b, work / "A", work, a, b, args.kill_trials, args.seed)
        result["corruptions"] = corrupted_inputs(work / "B", work / "A", work, a, b, args)
    result["loads_wrong"] = sum(r["outcome"] == "wrong" for r in result["save_faults"]) + result["kill_trials"][
        "outcomes"
    ].get("wrong", 0)
    result["accepted_silently"] = sum(c.get("accepted", 0) for c in result["corruptions"].values())
    result["total_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "reliability.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
