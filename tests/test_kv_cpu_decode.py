"""The CPU decode step (widened chunks, one softmax): the same attention as the general packed path.

Tolerance of the unit test, derived as in ``test_kv_blockwise``: both sides widen the same codes to the same
values (``dequantize``), so what differs is the rounding of the float32 sums: the scores over head_dim (an
absolute error ``e`` in a score moves the output by at most ``2 e`` times the largest value), the softmax's sum
and the value sums over the columns, relative to the largest value magnitude.
"""

from __future__ import annotations

import pytest
import torch
from tensor_memory import PeakTensorBytes
from test_kv_blockwise import HEAD_DIM, LAYOUTS, _past, _reference
from test_kv_packed import SharedCodes, _chunked_logits
from test_kv_quant import SMALL, _prompts
from tiny_models import left_pad, load, load_tokenizer
from tolerances import packed_attention_sums, relative_error, reordered, within

from intactkv_modifier.kv_quant import (
    KeyFavoredQuantizedCache,
    KVQuantSettings,
    attention,
    cpu_decode,
    cpu_kernel,
    packed_ops,
)
from intactkv_modifier.kv_quant.attention import packed_implementation
from intactkv_modifier.kv_quant.quantizer import dequantize, quantize
from intactkv_modifier.kv_quant.settings import TensorQuantSettings
from intactkv_modifier.kv_quant.stream import QuantizedSegment, dequantized

pytestmark = pytest.mark.numerics  # CI runs these under other CPU kernels and thread counts too


def _magnitudes(segments) -> torch.Tensor:
    return torch.cat([dequantized(s, torch.float32) if isinstance(s, QuantizedSegment) else s for s in segments],
                     dim=2).abs().double()


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "boolean", "additive"])
@pytest.mark.parametrize("skip", [0, 5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_step_attends_like_dequantize_then_attend(layout, skip, mask_kind, chunked, monkeypatch):
    """GQA group of 3, one new token, a partly skipped first group, every mask form; the compiled loop where it
    applies, or the torch ops (one chunk, or 16 tokens each)."""
    if chunked:
        monkeypatch.setattr(packed_ops, "CHUNK_ELEMENTS", 2 * 2 * 16 * HEAD_DIM)
        monkeypatch.setattr(cpu_kernel, "kernel_ready", lambda *args: False)
    keys, values, generator = _past(layout, skip, 1)
    query = torch.randn(2, 2, 3, 1, HEAD_DIM, generator=generator)
    columns = sum(s.num_tokens if isinstance(s, QuantizedSegment) else s.shape[2] for s in keys)
    keep = torch.ones(2, 1, 1, columns, dtype=torch.bool)
    if mask_kind != "none":
        keep[1, ..., 0], keep[0, ..., 20] = False, False  # a padded prefix, a quantized token
    mask = {"none": None, "boolean": keep,
            "additive": torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)}[mask_kind]

    actual = cpu_decode.cpu_decode(query, keys[:-1], values[:-1], keys[-1], values[-1], mask, 0.25, None)
    expected = _reference(query, keys, values, keep, 0.25)

    largest_score = float((query.abs().double() @ _magnitudes(keys).unsqueeze(2).transpose(-1, -2)).max()) * 0.25
    bound = 2 * reordered([HEAD_DIM]) * largest_score + reordered([columns] * 2)
    assert within(float((actual.double() - expected).abs().max() / _magnitudes(values).max()), bound)


def test_several_queries_and_other_devices_are_left_to_the_general_path():
    keys, values, generator = _past(LAYOUTS[0], 0, 2)
    query = torch.randn(2, 2, 3, 2, HEAD_DIM, generator=generator)
    assert cpu_decode.cpu_decode(query, keys[:-1], values[:-1], keys[-1], values[-1], None, 0.25, None) is None
    meta = torch.empty(2, 2, 3, 1, HEAD_DIM, device="meta")
    assert cpu_decode.cpu_decode(meta, keys[:-1], values[:-1], keys[-1], values[-1], None, 0.25, None) is None


@pytest.mark.parametrize("base", ["eager", "sdpa"])
@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_model_decoding_through_the_cpu_step_matches_the_general_packed_path(
    tiny_model_dirs, architecture, base, monkeypatch
):
    """Chunked prefill, then one token per call: every decode step of the CPU path against the blockwise one."""
    calls = []
    monkeypatch.setattr(attention, "cpu_decode", lambda *a: calls.append(1) or cpu_decode.cpu_decode(*a))
    model = load(tiny_model_dirs[architecture])
    model.set_attn_implementation(packed_implementation(base))
    ids, mask = left_pad(_prompts(load_tokenizer(tiny_model_dirs[architecture]), (30, 39)), 0)
    bound = reordered(packed_attention_sums(model.config, ids.shape[1]))
    codes = SharedCodes(monkeypatch, bound)
    settings = KVQuantSettings.from_bits(4, 2, **SMALL)
    logits = []
    for share in (codes.record, codes.replay):
        share()
        cache = KeyFavoredQuantizedCache(model.config, settings, 1, [9, 0])
        logits.append(_chunked_logits(model, ids, mask, cache))
        monkeypatch.setattr(attention, "cpu_decode", lambda *a: None)  # the second run: the general path
    codes.done()
    assert len(calls) >= ids.shape[1] - 20  # the first run's decode steps, every layer
    assert within(relative_error(*logits), bound)


@pytest.mark.parametrize("torch_ops", [False, True])
def test_a_decode_step_never_holds_the_widened_past_at_once(monkeypatch, torch_ops):
    """2048 quantized tokens widened 64 at a time (or a token at a time in the compiled loop): the step adds its
    scores and one chunk, not the past's values."""
    if torch_ops:
        monkeypatch.setattr(cpu_kernel, "kernel_ready", lambda *args: False)
    monkeypatch.setattr(packed_ops, "CHUNK_ELEMENTS", 2 * 2 * 64 * HEAD_DIM)
    keys, values, generator = _past(LAYOUTS[0], 0, 1, tokens=2048)
    query = torch.randn(2, 2, 3, 1, HEAD_DIM, generator=generator)
    with PeakTensorBytes() as memory:
        cpu_decode.cpu_decode(query, keys[:-1], values[:-1], keys[-1], values[-1], None, 0.25, None)
    widened_past = 2 * keys[1].tensor.codes.shape[0] * 2 * 2048 * HEAD_DIM * 4  # keys and values, float32
    assert memory.peak < widened_past / 4


@pytest.mark.parametrize("granularity", ["per_channel", "per_token"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_compiled_loop_scores_and_sums_what_dequantize_holds(bits, granularity):
    """Every one-byte packing and grouping, heads apart in a larger buffer as in the cache: the products of
    the dequantized past, up to float32 reordering of the sums."""
    settings = TensorQuantSettings(bits=bits, granularity=granularity, group_size=16)
    generator = torch.Generator().manual_seed(bits)
    stored = quantize(torch.randn(2, 3, 96, HEAD_DIM, generator=generator) * 4 + 1, settings)
    tensor = stored.token_slice(32, 96)  # rows of a larger buffer, as GrowingTensor's views
    if not cpu_kernel.kernel_ready(torch.float32, tensor, HEAD_DIM):
        pytest.skip("no compiler for the CPU decode loop here")
    query = torch.randn(2, 3, 4, HEAD_DIM, generator=generator)
    probs = torch.softmax(torch.randn(2, 3, 4, 64, generator=generator), dim=-1)
    values = dequantize(tensor).double()

    scores = cpu_kernel.key_scores(query, tensor)
    sums = cpu_kernel.value_sums(probs, tensor, HEAD_DIM)

    largest_score = float((query.abs().double() @ values.abs().transpose(-1, -2)).max())
    assert within(float((scores.double() - query.double() @ values.transpose(-1, -2)).abs().max()),
                  reordered([HEAD_DIM]) * largest_score)
    assert within(float((sums.double() - probs.double() @ values).abs().max() / values.abs().max()),
                  reordered([64]))
