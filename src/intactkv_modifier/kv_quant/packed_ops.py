"""Attention scores and value sums read straight from packed codes: the dequantized past is never built.

A quantized element is ``x = s * code + z`` with ``s`` and ``z`` shared by its
group, so the scale and minimum move onto the (small) query or probability side:

* keys per channel (one ``s_c``, ``z_c`` per channel for a block of tokens):
  ``q . k_t = sum_c (q_c s_c) code_tc + sum_c q_c z_c``;
* keys per token (one ``s``, ``z`` per token for a group ``j`` of channels):
  ``q . k_t = sum_j s_tj (q_j . code_tj) + sum_j z_tj sum_{c in j} q_c``;
* values per token: ``sum_t p_t v_tc = sum_t (p_t s_tj) code_tc + sum_t p_t z_tj``;
* values per channel: ``sum_t p_t v_tc = sum_g s_gc sum_{t in g} p_t code_tc + sum_g z_gc sum_{t in g} p_t``.

Only the codes are widened (to the compute dtype, a chunk of tokens at a time,
so the transient memory is bounded by :data:`CHUNK_ELEMENTS`, not by the
context); no scale is broadcast over the past and no full-precision copy of it
is concatenated. Queries arrive grouped by KV head (``[batch, kv_heads, queries, head_dim]``,
GQA queries folded into the query axis), so no K/V head is ever repeated.
"""

from __future__ import annotations

import operator
from functools import reduce

import torch

from intactkv_modifier.kv_quant.packing import unpack
from intactkv_modifier.kv_quant.quantizer import QuantizedTensor
from intactkv_modifier.kv_quant.stream import QuantizedSegment, Segment

__all__ = ["CHUNK_ELEMENTS", "key_scores", "token_chunks", "weighted_values"]

#: Widened codes processed at once (16 MiB in float32): bounds the transient memory of a step
CHUNK_ELEMENTS = 1 << 22


def key_scores(query: torch.Tensor, segment: Segment) -> torch.Tensor:
    """``query @ keys^T`` for the segment's tokens: ``[b, h, m, d]`` x segment -> ``[b, h, m, tokens]``."""
    if not isinstance(segment, QuantizedSegment):
        return query @ segment.transpose(-1, -2)
    scores = torch.cat([_quantized_key_scores(query, chunk) for chunk in token_chunks(segment.tensor)], dim=-1)
    return scores[..., segment.skip : segment.skip + segment.num_tokens]


def weighted_values(probs: torch.Tensor, segment: Segment) -> torch.Tensor:
    """``probs @ values`` for the segment's tokens: ``[b, h, m, tokens]`` x segment -> ``[b, h, m, d]``."""
    if not isinstance(segment, QuantizedSegment):
        return probs @ segment
    probs = torch.nn.functional.pad(probs, (segment.skip, segment.tail))  # tokens not attended weigh nothing
    chunks = token_chunks(segment.tensor)
    weights = probs.split([chunk.num_tokens for chunk in chunks], dim=-1)
    return reduce(operator.add, (_quantized_weighted_values(w, chunk) for w, chunk in zip(weights, chunks)))


def token_chunks(tensor: QuantizedTensor) -> list[QuantizedTensor]:
    """Whole groups of tokens, each widening to at most about :data:`CHUNK_ELEMENTS` elements."""
    block = tensor.settings.token_block
    rows, heads, tokens = tensor.codes.shape[:3]
    per_token = tensor.settings.granularity == "per_token"
    head_dim = tensor.scale.shape[-1] * (tensor.settings.group_size if per_token else 1)
    step = max(block, CHUNK_ELEMENTS // max(1, rows * heads * head_dim) // block * block)
    if step >= tokens:
        return [tensor]
    return [tensor.token_slice(begin, min(begin + step, tokens)) for begin in range(0, tokens, step)]


def _codes(tensor: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The integer codes ``[b, h, tokens, head_dim]`` in ``dtype`` (exact: codes are below 256)."""
    return unpack(tensor.codes, tensor.settings.bits).to(dtype)


def _quantized_key_scores(query: torch.Tensor, keys: QuantizedTensor) -> torch.Tensor:
    codes = _codes(keys, query.dtype)
    size = keys.settings.group_size
    scale, minimum = keys.scale.to(query.dtype), keys.minimum.to(query.dtype)
    if keys.settings.granularity == "per_channel":
        # [b, h, G, m, d] @ [b, h, G, d, size] -> [b, h, G, m, size]
        scaled = query.unsqueeze(2) * scale.unsqueeze(3)
        scores = scaled @ codes.unflatten(2, (-1, size)).transpose(-1, -2)
        offsets = (query @ minimum.transpose(-1, -2)).transpose(2, 3).unsqueeze(-1)  # [b, h, G, m, 1]
        return (scores + offsets).permute(0, 1, 3, 2, 4).flatten(3)
    # per token: [b, h, J, m, size] @ [b, h, J, size, tokens] -> [b, h, J, m, tokens], weighted by s_tj over J
    grouped_query = query.unflatten(-1, (-1, size)).transpose(2, 3)
    partial = grouped_query @ codes.unflatten(-1, (-1, size)).permute(0, 1, 3, 4, 2)
    scores = (partial * scale.permute(0, 1, 3, 2).unsqueeze(3)).sum(dim=2)
    return scores + grouped_query.sum(dim=-1).transpose(2, 3) @ minimum.transpose(-1, -2)


def _quantized_weighted_values(probs: torch.Tensor, values: QuantizedTensor) -> torch.Tensor:
    codes = _codes(values, probs.dtype)
    size = values.settings.group_size
    scale, minimum = values.scale.to(probs.dtype), values.minimum.to(probs.dtype)
    if values.settings.granularity == "per_token":
        # [b, h, J, m, tokens] @ [b, h, J, tokens, size] -> [b, h, J, m, size]
        weighted = probs.unsqueeze(2) * scale.permute(0, 1, 3, 2).unsqueeze(3)
        sums = weighted @ codes.unflatten(-1, (-1, size)).transpose(2, 3)
        return sums.permute(0, 1, 3, 2, 4).flatten(3) + (probs @ minimum).repeat_interleave(size, dim=-1)
    # per channel: [b, h, G, m, size] @ [b, h, G, size, d] -> [b, h, G, m, d], weighted by s_gc over G
    grouped_probs = probs.unflatten(-1, (-1, size)).transpose(2, 3)
    sums = grouped_probs @ codes.unflatten(2, (-1, size))
    return (sums * scale.unsqueeze(3)).sum(dim=2) + grouped_probs.sum(dim=-1).transpose(2, 3) @ minimum
