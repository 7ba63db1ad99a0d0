"""Attention over stored segments a block of columns at a time, with a running softmax: memory follows the block.

A call with many queries over a long quantized past (chunked prefill, a second
turn, speculative verification) would otherwise hold ``queries x past`` scores at
once (59 rows of 32 heads, a 2048-token chunk over a 32K past: 472 GiB in float32;
the H200 ran out of memory), where the full-precision cache's SDPA tiles the same
attention in place. Here the
columns (the stored tokens, then the call's own) are taken a block at a time:
each block's scores are masked, folded into a running maximum and sum, and its
value sums added to an output that is rescaled whenever the maximum grows (the
online softmax of flash attention, which the Triton decode kernel runs over its
tiles). What a call allocates is then that of one block: ``queries x block``
scores and the block's widened codes, whatever the length of the past.

A block is as many columns as keep its scores within :data:`BLOCK_SCORES`
elements, and at least :data:`MIN_BLOCK_COLUMNS`: a decode step over an ordinary
context is one block.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import torch

from intactkv_modifier.kv_quant.packed_ops import key_scores, weighted_values
from intactkv_modifier.kv_quant.stream import Segment, segment_tokens, segments_between

__all__ = ["BLOCK_SCORES", "MIN_BLOCK_COLUMNS", "attend_segments", "block_columns"]

#: Scores one block may hold (64 MiB in float32)
BLOCK_SCORES = 1 << 24
#: Columns of a block at least, however many queries (fewer would spend the time on launching operations)
MIN_BLOCK_COLUMNS = 128
#: Masked scores: finite, so that a block masked entirely cannot make the running maximum NaN
_MASKED = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class _Running:
    """The softmax so far over each query's row of scores: its maximum, its sum and the weighted values."""

    maximum: torch.Tensor  # [b, h, m, 1]
    total: torch.Tensor  # [b, h, m, 1]
    output: torch.Tensor  # [b, h, m, d], float32, not yet divided by total


def block_columns(score_rows: int) -> int:
    """Columns per block for ``score_rows`` rows of scores (batch x KV heads x queries of a head)."""
    return max(MIN_BLOCK_COLUMNS, BLOCK_SCORES // max(1, score_rows))


def attend_segments(
    query: torch.Tensor,
    keys: Sequence[Segment],
    values: Sequence[Segment],
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    block: int | None = None,
) -> torch.Tensor:
    """``query`` ``[b, kv_heads, group, q, d]`` over the segments -> ``[b, kv_heads, group, q, d]``.

    ``keys``/``values`` are the stored segments followed by the call's new tokens;
    ``mask`` ``[b, 1, q, columns]`` (sdpa's boolean keep or eager's additive), or
    ``None`` for every stored token visible and the new ones causal.
    :param block: columns per block (default :func:`block_columns`)
    """
    batch, kv_heads, group, queries, head_dim = query.shape
    folded = query.flatten(2, 3)  # the GQA group shares its K/V head: fold it into the query axis
    columns = sum(segment_tokens(segment) for segment in keys)
    block = block or block_columns(batch * kv_heads * group * queries)
    running: _Running | None = None
    for begin in range(0, columns, block):
        end = min(begin + block, columns)
        whole = begin == 0 and end == columns
        key_part = list(keys) if whole else segments_between(keys, begin, end)
        value_part = list(values) if whole else segments_between(values, begin, end)
        scores = _block_scores(folded, key_part, scaling, softcap).unflatten(2, (group, queries))
        scores = _masked(scores, mask, begin, end, columns).flatten(2, 3)
        running = _fold(running, scores, value_part, query.dtype)
    assert running is not None, "attention over no columns"
    return (running.output / running.total).to(query.dtype).unflatten(2, (group, queries))


def _block_scores(
    query: torch.Tensor, keys: list[Segment], scaling: float, softcap: float | None
) -> torch.Tensor:
    """float32 ``[b, h, m, columns]`` scores of the block, scaled (and soft-capped)."""
    parts = [key_scores(query, segment) for segment in keys]
    scores = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).float() * scaling
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _masked(scores: torch.Tensor, mask: torch.Tensor | None, begin: int, end: int, columns: int) -> torch.Tensor:
    """``[b, h, g, q, n]`` scores of columns ``begin .. end - 1`` with the mask applied."""
    queries = scores.shape[3]
    if mask is None:
        if end - 1 <= columns - queries:  # the block ends before the second new token: all visible to all
            return scores
        column = torch.arange(begin, end, device=scores.device)
        last_visible = torch.arange(columns - queries, columns, device=scores.device)[:, None]
        return scores.masked_fill(column > last_visible, _MASKED)
    mask = mask[..., begin:end].unsqueeze(2)
    if mask.dtype == torch.bool:  # sdpa's masks say where to attend, eager's what to add
        return scores.masked_fill(~mask, _MASKED)
    return scores + mask.float()


def _fold(running: _Running | None, scores: torch.Tensor, values: list[Segment], dtype: torch.dtype) -> _Running:
    """``running`` with one more block of columns: its scores and its value segments."""
    maximum = scores.amax(dim=-1, keepdim=True).clamp_min(_MASKED)  # -inf from an additive -inf mask stays finite
    if running is not None:
        maximum = torch.maximum(running.maximum, maximum)
    probs = torch.exp(scores - maximum)
    total = probs.sum(dim=-1, keepdim=True)
    weights = probs.to(dtype).split([segment_tokens(segment) for segment in values], dim=-1)
    output = reduce(operator.add, (weighted_values(w, segment) for w, segment in zip(weights, values))).float()
    if running is None:
        return _Running(maximum, total, output)
    rescale = torch.exp(running.maximum - maximum)
    return _Running(maximum, running.total * rescale + total, running.output * rescale + output)
