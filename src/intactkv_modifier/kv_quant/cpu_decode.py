"""A decode step over the packed past in a few large torch operations: the path a CPU takes.

On a CPU the general packed path (:mod:`~intactkv_modifier.kv_quant.blockwise` over
:mod:`~intactkv_modifier.kv_quant.packed_ops`, the reference every packed path is
tested against) spends a decode step on many small operations: each stored segment
scored and summed on its own, per-group batched products of a few columns each, a
softmax made to be cut into blocks. For one query token per row this path instead

* concatenates the exact tokens (prefix, residual, new token) and attends them with one product each way;
* reads the quantized tokens through a compiled loop that widens one token at a time where it is built
  (:mod:`~intactkv_modifier.kv_quant.cpu_kernel`); else
* widens the quantized tokens a chunk at a time (at most :data:`~intactkv_modifier.kv_quant.packed_ops.CHUNK_ELEMENTS`
  elements, as on the general path: the transient memory is that of the widened codes either way) straight to
  their values, ``code * scale + minimum`` (:func:`~intactkv_modifier.kv_quant.quantizer.dequantize`), and
  scores and sums each chunk with one matrix product;
* runs one softmax over every column.

Measured on the session machine (AMD EPYC, one thread, torch 2.13, a 2048-token layer, K4 per channel, V2
per token): widening to values and one product take about 0.18 ms for the keys and 0.20 ms for the values,
against 0.22 ms and 0.40 ms for the same step computed on the codes group by group, the scales moved onto the
query and the probabilities (small batched products, and scales broadcast over the probabilities, run far
below the CPU's speed); a 4-layer 512-wide model decodes 2048
tokens of context at 0.84x the full-precision cache here against 0.70x on the general path. torch.compile
(inductor's C++) is no use for this step: with dynamic lengths, as a cache that grows every step needs, its
loop for the same widening took 7.5 ms (values) and 1.3 ms (keys), and recompiling per length is no option.
:func:`cpu_decode` returns ``None`` for anything else (other devices, several queries, several quantized
parts), which the general path then attends.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from intactkv_modifier.kv_quant import cpu_kernel
from intactkv_modifier.kv_quant.packed_ops import token_chunks
from intactkv_modifier.kv_quant.quantizer import dequantize
from intactkv_modifier.kv_quant.stream import QuantizedSegment, Segment, quantized_layout

__all__ = ["cpu_decode"]


def cpu_decode(
    query: torch.Tensor,
    keys: Sequence[Segment],
    values: Sequence[Segment],
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor | None:
    """The decode step of :func:`~intactkv_modifier.kv_quant.fast_decode.kernel_decode` (same arguments and
    result) on a CPU; ``None`` where it does not apply."""
    if query.device.type != "cpu" or query.shape[3] != 1 or (mask is not None and mask.shape[1:3] != (1, 1)):
        return None
    key_layout, value_layout = quantized_layout(keys), quantized_layout(values)
    if key_layout is None or value_layout is None or key_layout[1] != value_layout[1]:
        return None
    (quantized_keys, before, _), quantized_values = key_layout, value_layout[0]
    if (quantized_keys is None) != (quantized_values is None) or (
        quantized_keys is not None and quantized_keys.num_tokens != quantized_values.num_tokens
    ):
        return None
    folded = query[:, :, :, 0]  # [b, h, group, d]: the GQA group shares its K/V head
    exact_keys = torch.cat([*(s for s in keys if not isinstance(s, QuantizedSegment)), new_keys], dim=2)
    exact_values = torch.cat([*(s for s in values if not isinstance(s, QuantizedSegment)), new_values], dim=2)
    scores = folded @ exact_keys.transpose(-1, -2)
    if quantized_keys is not None:
        scores = torch.cat([scores, *_quantized_scores(folded, quantized_keys)], dim=-1)
        mask = None if mask is None else _exact_columns_first(mask, before, quantized_keys.num_tokens)
    probs = _softmax(scores, mask, scaling, softcap).to(query.dtype)
    exact = exact_keys.shape[2]
    output = probs[..., :exact] @ exact_values
    if quantized_values is not None:
        output = output + _quantized_sums(probs[..., exact:], quantized_values, exact_values.shape[-1])
    return output.unsqueeze(3)


def _quantized_scores(folded: torch.Tensor, segment: QuantizedSegment) -> list[torch.Tensor]:
    """Scores of the segment's attended tokens, in order: from the compiled loop, else chunk by chunk."""
    if cpu_kernel.kernel_ready(folded.dtype, segment.tensor, folded.shape[-1]):
        return [cpu_kernel.key_scores(folded, segment.tensor)[..., segment.skip : segment.skip + segment.num_tokens]]
    return [folded @ chunk.transpose(-1, -2) for chunk in _attended_chunks(segment, folded.dtype)]


def _quantized_sums(probs: torch.Tensor, segment: QuantizedSegment, dim: int) -> torch.Tensor:
    """``probs`` (one column per attended token) times the segment's values."""
    if cpu_kernel.kernel_ready(probs.dtype, segment.tensor, dim):
        weights = torch.nn.functional.pad(probs, (segment.skip, segment.tail))  # tokens not attended weigh nothing
        return cpu_kernel.value_sums(weights, segment.tensor, dim)
    output, begin = None, 0
    for chunk in _attended_chunks(segment, probs.dtype):
        part = probs[..., begin : begin + chunk.shape[2]] @ chunk
        output = part if output is None else output + part
        begin += chunk.shape[2]
    return output


def _attended_chunks(segment: QuantizedSegment, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The segment's attended tokens ``[b, h, tokens, d]`` in ``dtype``, a chunk of whole groups at a time."""
    begin, end = segment.skip, segment.skip + segment.num_tokens
    offset = 0
    for chunk in token_chunks(segment.tensor):
        length = chunk.num_tokens
        if offset + length > begin and offset < end:
            yield dequantize(chunk, dtype)[:, :, max(begin - offset, 0) : end - offset]
        offset += length


def _softmax(scores: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None) -> torch.Tensor:
    scores = scores.float() * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None and mask.dtype == torch.bool:  # sdpa's masks say where to attend, eager's what to add
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    elif mask is not None:
        scores = scores + mask.float()
    return torch.softmax(scores, dim=-1)


def _exact_columns_first(mask: torch.Tensor, before: int, quantized: int) -> torch.Tensor:
    """The mask's columns in the order the scores are computed: exact tokens, then quantized ones."""
    return torch.cat([mask[..., :before], mask[..., before + quantized :], mask[..., before : before + quantized]], -1)
