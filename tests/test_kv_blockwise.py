"""Attention over the packed past a block of columns at a time: one pass's result, in memory that follows the block.

Tolerance of the unit tests, derived: an absolute error ``e`` in a score scales its probability by ``exp(e)``, which
moves the output by at most ``2 e`` times the largest value (``sum_t p_t |v_t - o|``); the scores' error is the
rounding of two sums over head_dim (codes, then offsets) of the magnitudes the packed path adds, times the scaling.
The value sums, the softmax's sum over the columns and one rescaling per block round relative to the largest value
magnitude added. Both are relative to that magnitude (``|v - z| + |z|`` for a quantized value with minimum ``z``).
"""

from __future__ import annotations

import pytest
import torch
from tensor_memory import PeakTensorBytes
from test_kv_packed import SharedCodes, _chunked_logits
from test_kv_quant import SMALL, _per_element, _prompts
from tiny_models import left_pad, load, load_tokenizer
from tolerances import packed_attention_sums, relative_error, reordered, within

from intactkv_modifier.kv_quant import (
    KeyFavoredQuantizedCache,
    KVQuantSettings,
    TensorQuantSettings,
    attention,
    blockwise,
)
from intactkv_modifier.kv_quant.attention import packed_implementation
from intactkv_modifier.kv_quant.quantizer import quantize
from intactkv_modifier.kv_quant.stream import QuantizedSegment, Segment, dequantized, segments_between

pytestmark = pytest.mark.numerics  # CI runs these under other CPU kernels and thread counts too

HEAD_DIM = 32
#: column blocks: 5 and 37 cut groups of 16 tokens in the middle, ``None`` is one block of everything
BLOCKS = (5, 16, 37, None)
#: the four ways keys and values may be grouped, with bit widths that cover both packing units
LAYOUTS = [("per_channel", 4, "per_token", 2), ("per_token", 3, "per_token", 8),
           ("per_channel", 2, "per_channel", 4), ("per_token", 8, "per_channel", 3)]


def _past(layout: tuple, skip: int, queries: int, tokens: int = 96, batch: int = 2, heads: int = 2):
    """Prefix (1 token) | quantized (``tokens``, outlier key channels, the first ``skip`` not attended) | residual
    (7) | the call's ``queries`` new tokens; keys and values as the cache hands them over (the values' first whole
    per-token groups already dropped, as a stream does)."""
    key_granularity, key_bits, value_granularity, value_bits = layout
    generator = torch.Generator().manual_seed(key_bits * 10 + value_bits + skip)

    def states(count: int, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        return torch.randn(batch, heads, count, HEAD_DIM, generator=generator) * scale

    def stored(settings: TensorQuantSettings, scale: torch.Tensor | float) -> QuantizedSegment:
        quantized = quantize(states(tokens, scale) + 0.3, settings)
        whole = skip // settings.token_block * settings.token_block
        return QuantizedSegment(quantized.drop_leading(whole), skip - whole)

    outliers = torch.logspace(-1, 1, HEAD_DIM)
    key_settings = TensorQuantSettings(bits=key_bits, granularity=key_granularity, group_size=16)
    value_settings = TensorQuantSettings(bits=value_bits, granularity=value_granularity, group_size=16)
    keys = [states(1, 5.0), stored(key_settings, outliers), states(7, outliers), states(queries, outliers)]
    values = [states(1), stored(value_settings, 1.0), states(7), states(queries)]
    return keys, values, generator


def _summed(segments: list[Segment]) -> torch.Tensor:
    """Per element the magnitude the packed path adds for it: ``|x - z| + |z|`` quantized, ``|x|`` exact."""
    parts = []
    for segment in segments:
        if isinstance(segment, QuantizedSegment):
            tensor, attended = segment.tensor, slice(segment.skip, segment.skip + segment.num_tokens)
            minimum = _per_element(tensor.minimum, tensor.settings)[:, :, attended]
            parts.append((dequantized(segment, torch.float32) - minimum).abs() + minimum.abs())
        else:
            parts.append(segment.abs())
    return torch.cat(parts, dim=2).double()


def _reference(query, keys, values, keep, scaling) -> torch.Tensor:
    """Dequantize, then attend, in float64."""
    keys, values = (torch.cat([dequantized(s, torch.float32) for s in part], dim=2).double() for part in (keys, values))
    scores = (query.double() @ keys.unsqueeze(2).transpose(-1, -2)) * scaling
    return torch.softmax(scores.masked_fill(~keep.unsqueeze(2), float("-inf")), dim=-1) @ values.unsqueeze(2)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("mask_kind", ["none", "boolean", "additive"])
@pytest.mark.parametrize("skip", [0, 5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_blocks_of_columns_attend_like_dequantize_then_attend(layout, skip, mask_kind, block):
    """GQA group of 3, a 6-token chunk, a partly skipped first group, every mask form attention hands over."""
    queries, scaling = 6, 0.25
    keys, values, generator = _past(layout, skip, queries)
    query = torch.randn(2, 2, 3, queries, HEAD_DIM, generator=generator)
    columns = sum(s.num_tokens if isinstance(s, QuantizedSegment) else s.shape[2] for s in keys)
    keep = torch.ones(queries, columns, dtype=torch.bool).tril(columns - queries).repeat(2, 1, 1, 1)
    keep[1, :, :, 0], keep[0, :, :, 20] = False, False  # a padded prefix, a quantized token
    mask = {"none": None, "boolean": keep,
            "additive": torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)}[mask_kind]
    if mask_kind == "none":
        keep = torch.ones(queries, columns, dtype=torch.bool).tril(columns - queries).repeat(2, 1, 1, 1)

    actual = blockwise.attend_segments(query, keys, values, mask, scaling, None, block)
    expected = _reference(query, keys, values, keep, scaling)

    blocks = -(-columns // (block or columns))
    largest_score = float((query.abs() @ _summed(keys).float().unsqueeze(2).transpose(-1, -2)).max()) * scaling
    bound = 2 * reordered([HEAD_DIM] * 2) * largest_score + reordered([columns] * 3 + [blocks])
    assert within(float((actual.double() - expected).abs().max() / _summed(values).max()), bound)


def test_cutting_segments_keeps_every_attended_token_once():
    keys, _, _ = _past(LAYOUTS[0], 5, 4)
    columns = 1 + 91 + 7 + 4
    whole = torch.cat([dequantized(s, torch.float32) for s in keys], dim=2)
    for begin, end in ((0, columns), (0, 3), (2, 17), (40, 90), (90, 100), (99, columns)):
        part = segments_between(keys, begin, end)
        assert torch.equal(torch.cat([dequantized(s, torch.float32) for s in part], dim=2), whole[:, :, begin:end])


@pytest.mark.parametrize("base", ["eager", "sdpa"])
@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_model_attending_in_blocks_of_five_columns_matches_the_reference_path(
    tiny_model_dirs, architecture, base, monkeypatch
):
    """Chunked prefill and decoding with every call cut into 5-column blocks; Gemma 3's sliding-window layer too."""
    monkeypatch.setattr(blockwise, "BLOCK_SCORES", 1)
    monkeypatch.setattr(blockwise, "MIN_BLOCK_COLUMNS", 5)
    calls = []
    original = blockwise._fold
    monkeypatch.setattr(blockwise, "_fold", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(attention, "cpu_decode", lambda *a: None)  # decode steps too, where a CPU has its own path
    model = load(tiny_model_dirs[architecture])
    model.set_attn_implementation(packed_implementation(base))
    ids, mask = left_pad(_prompts(load_tokenizer(tiny_model_dirs[architecture]), (30, 39)), 0)
    bound = reordered(packed_attention_sums(model.config, ids.shape[1]) + [ids.shape[1] // 5])  # + the rescalings
    codes = SharedCodes(monkeypatch, bound)
    settings = KVQuantSettings.from_bits(4, 2, **SMALL)
    logits = []
    for packed, share in ((True, codes.record), (False, codes.replay)):
        share()
        cache = KeyFavoredQuantizedCache(model.config, settings, 1, [9, 0], packed_attention=packed)
        logits.append(_chunked_logits(model, ids, mask, cache))
    codes.done()
    assert len(calls) > 2 * ids.shape[1]  # several blocks per call
    assert within(relative_error(*logits), bound)


def test_peak_memory_of_a_chunk_grows_with_the_block_not_the_past():
    """A 32-token chunk over 512 and 2048 stored tokens: the same peak for the same block, twice the block more."""

    def peak(tokens: int, block: int | None) -> int:
        keys, values, generator = _past(LAYOUTS[0], 0, 32, tokens=tokens, batch=1)
        query = torch.randn(1, 2, 2, 32, HEAD_DIM, generator=generator)
        columns = 1 + tokens + 7 + 32
        keep = torch.ones(32, columns, dtype=torch.bool).tril(columns - 32).expand(1, 1, -1, -1)
        with PeakTensorBytes() as memory:
            blockwise.attend_segments(query, keys, values, keep, 0.25, None, block)
        return memory.peak

    for block in (64, 128):
        assert peak(2048, block) == peak(512, block)
    assert peak(512, 128) > 1.5 * peak(512, 64)
    # in one pass the scores of the whole past are held: the measure does see them
    assert peak(2048, None) > 3 * peak(512, None) > 3 * peak(512, 128)
