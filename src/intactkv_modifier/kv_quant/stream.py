"""One tensor (keys or values) of a group of cache rows along the token axis: FP prefix | quantized | FP residual.

Tokens are addressed by *slot*, their index in the row (left padding included).
Tokens leave the residual in blocks shared by a layer's keys and values (the
larger of their groups along the token axis): per-token values could leave one
by one, but quantizing them with the keys' blocks costs one quantization per
block instead of one per decoded token, and keeps them exact a little longer.

A sliding-window layer makes its streams forget the slots no later query can
see: the prefix and the residual drop single tokens, the quantized region whole
blocks (a per-channel group cannot be split), so a stream may hold up to a block
more than the window; :meth:`TokenStream.segments` leaves those tokens out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from intactkv_modifier.kv_quant.quantizer import QuantizedTensor, dequantize, quantize
from intactkv_modifier.kv_quant.settings import TensorQuantSettings
from intactkv_modifier.kv_quant.storage import QuantizedStore

__all__ = [
    "QuantizedSegment", "Segment", "TokenStream", "quantizable_tokens", "quantized_layout", "segment_tokens",
    "segments_between",
]


def quantizable_tokens(pending: int, residual_length: int, block: int) -> int:
    """How many of the ``pending`` oldest full-precision tokens to quantize now.

    Whole blocks only, and never so many that fewer than ``residual_length``
    tokens stay in full precision.
    """
    return max(0, pending - residual_length) // block * block


@dataclass(frozen=True)
class QuantizedSegment:
    """Quantized tokens to attend, except the first ``skip`` and the last ``tail``.

    Skipped tokens are older ones sharing the first per-channel group (a sliding
    window's start); a tail only appears when attention cuts the past into blocks
    (:func:`segments_between`) at a column inside a group.
    """

    tensor: QuantizedTensor
    skip: int
    tail: int = 0

    @property
    def num_tokens(self) -> int:
        return self.tensor.num_tokens - self.skip - self.tail


#: Consecutive stored tokens to attend: full precision, or quantized
Segment = torch.Tensor | QuantizedSegment


def segment_tokens(segment: Segment) -> int:
    return segment.num_tokens if isinstance(segment, QuantizedSegment) else segment.shape[2]


def segments_between(segments: Sequence[Segment], begin: int, end: int) -> list[Segment]:
    """The attended tokens ``begin .. end - 1`` of ``segments`` (counted over all of them), as views.

    A quantized segment is cut at the groups around the two ends, and the tokens
    of those groups outside the range become its ``skip`` and ``tail``.
    """
    parts: list[Segment] = []
    offset = 0
    for segment in segments:
        tokens = segment_tokens(segment)
        first, last = max(begin - offset, 0), min(end - offset, tokens)
        if first < last:
            parts.append(_segment_slice(segment, first, last))
        offset += tokens
    return parts


def quantized_layout(segments: Sequence[Segment]) -> tuple[QuantizedSegment | None, int, int] | None:
    """The one quantized segment (or ``None``), the exact tokens before it and its skip.

    ``None`` for several quantized segments or one cut at its end (decode steps read whole segments).
    """
    quantized: QuantizedSegment | None = None
    before = 0
    for segment in segments:
        if not isinstance(segment, QuantizedSegment):
            before += 0 if quantized is not None else segment.shape[2]
        elif quantized is not None or segment.tail:
            return None
        else:
            quantized = segment
    return (None, 0, 0) if quantized is None else (quantized, before, quantized.skip)


def _segment_slice(segment: Segment, begin: int, end: int) -> Segment:
    if not isinstance(segment, QuantizedSegment):
        return segment[:, :, begin:end]
    block = segment.tensor.settings.token_block
    begin, end = begin + segment.skip, end + segment.skip  # tokens of the stored tensor
    whole_begin, whole_end = begin // block * block, -(-end // block) * block
    return QuantizedSegment(segment.tensor.token_slice(whole_begin, whole_end), begin - whole_begin, whole_end - end)


def dequantized(segment: Segment, dtype: torch.dtype) -> torch.Tensor:
    """A segment's tokens in full precision (the reference path: a copy of the quantized ones)."""
    if isinstance(segment, QuantizedSegment):
        return dequantize(segment.tensor, dtype)[:, :, segment.skip : segment.skip + segment.num_tokens]
    return segment


class TokenStream:
    """Keys or values of one group of rows: the first ``prefix_length`` slots exact, then quantized, then exact.

    :param block: tokens leave the residual in multiples of this (a multiple of
        the settings' own :attr:`~TensorQuantSettings.token_block`; by default that)
    """

    def __init__(
        self, settings: TensorQuantSettings, residual_length: int, prefix_length: int, block: int | None = None
    ):
        self.settings = settings
        self.residual_length = residual_length
        self.prefix_length = prefix_length
        self.block = settings.token_block if block is None else block
        if self.block % settings.token_block:
            raise ValueError(f"a block of {self.block} tokens does not hold whole groups of {settings.token_block}")
        self.length = 0
        self.prefix: torch.Tensor | None = None
        self.prefix_start = 0
        self.quantized: QuantizedStore | None = None
        self.quantized_start = prefix_length
        self.residual: torch.Tensor | None = None
        # (start, segments) of the prefix and the quantized region: read at every decode step of every layer,
        # rebuilt only when a start or what they hold changes
        self._stored: tuple[int, list[Segment]] | None = None

    @property
    def quantized_tokens(self) -> int:
        return 0 if self.quantized is None else self.quantized.num_tokens

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held; none is a view into a larger storage, so this is what the stream costs."""
        tensors = [t for t in (self.prefix, self.residual) if t is not None]
        quantized = 0 if self.quantized is None else self.quantized.nbytes
        return quantized + sum(t.numel() * t.element_size() for t in tensors)

    def segments(self, start: int = 0) -> list[Segment]:
        """The stored tokens from slot ``start`` on, oldest first, as stored (nothing dequantized)."""
        if self._stored is None or self._stored[0] != start:
            self._stored = start, self._prefix_and_quantized(start)
        parts = list(self._stored[1])
        if self.residual is not None:
            skip = max(0, start - (self.length - self.residual.shape[2]))
            if skip < self.residual.shape[2]:
                parts.append(self.residual[:, :, skip:] if skip else self.residual)
        return parts

    def _prefix_and_quantized(self, start: int) -> list[Segment]:
        """The non-empty prefix and quantized segments from slot ``start`` on: :meth:`segments` but the residual."""
        parts: list[Segment] = []
        if self.prefix is not None and start - self.prefix_start < self.prefix.shape[2]:
            skip = max(0, start - self.prefix_start)
            parts.append(self.prefix[:, :, skip:] if skip else self.prefix)
        if self.quantized is not None and start - self.quantized_start < self.quantized.num_tokens:
            skip = max(0, start - self.quantized_start)
            whole = skip // self.settings.token_block * self.settings.token_block
            kept = self.quantized.tensor()
            kept = kept.drop_leading(whole) if whole else kept
            parts.append(QuantizedSegment(kept, skip - whole))
        return [part for part in parts if segment_tokens(part) > 0]

    def read(self, start: int = 0, then: torch.Tensor | None = None) -> torch.Tensor | None:
        """Everything stored from slot ``start`` on, dequantized, followed by ``then``, in one concatenation."""
        parts = self.segments(start)
        if not parts:
            return then
        dtype = parts[0].tensor.scale.dtype if isinstance(parts[0], QuantizedSegment) else parts[0].dtype
        tensors = [dequantized(part, dtype) for part in parts]
        return torch.cat(tensors if then is None else [*tensors, then], dim=2)

    def append(self, states: torch.Tensor, keep_from: int = 0) -> None:
        """Store ``states`` as the next slots, then forget the slots before ``keep_from`` (sliding windows)."""
        states = states.detach()
        if self.prefix is None or self.residual is None:
            self.prefix = states[:, :, :0].clone()
            self.residual = self.prefix
        room = max(0, self.prefix_length - self.length)
        self.length += states.shape[2]
        if room:
            self._stored = None
            self.prefix = torch.cat([self.prefix, states[:, :, :room]], dim=2)
            states = states[:, :, room:]
        pending = torch.cat([self.residual, states], dim=2)
        if keep_from:  # slot 0 on: nothing to forget
            self._forget(keep_from)
        pending_start = self.length - pending.shape[2]
        stale = min(max(0, keep_from - pending_start), pending.shape[2])
        if stale:
            pending, pending_start = pending[:, :, stale:], pending_start + stale
        count = quantizable_tokens(pending.shape[2], self.residual_length, self.block)
        if count:
            self._stored = None
            block = quantize(pending[:, :, :count], self.settings)
            if self.quantized is None:
                self.quantized = QuantizedStore(block)
            else:
                self.quantized.append(block)
            if self.quantized.num_tokens == count:  # nothing older held (first block, or all forgotten)
                self.quantized_start = pending_start
        # a view would keep the quantized or forgotten tokens' full-precision storage alive
        self.residual = pending[:, :, count:].clone() if count or stale else pending

    def _forget(self, keep_from: int) -> None:
        """Drop the prefix tokens and the whole quantized blocks before slot ``keep_from``."""
        if self.prefix is not None:
            drop = min(max(0, keep_from - self.prefix_start), self.prefix.shape[2])
            if drop:
                self._stored = None
                self.prefix = self.prefix[:, :, drop:].clone()
                self.prefix_start += drop
        if self.quantized is None:
            return
        block = self.settings.token_block
        drop = min(max(0, keep_from - self.quantized_start) // block * block, self.quantized.num_tokens)
        if drop:
            self._stored = None
            self.quantized_start += drop
            self.quantized.drop_leading(drop)

    def select_rows(self, index: torch.Tensor) -> TokenStream:
        selected = TokenStream(self.settings, self.residual_length, self.prefix_length, self.block)
        selected.length, selected.prefix_start, selected.quantized_start = (
            self.length, self.prefix_start, self.quantized_start
        )
        if self.prefix is not None and self.residual is not None:
            selected.prefix = self.prefix.index_select(0, index)
            selected.residual = self.residual.index_select(0, index)
        if self.quantized is not None:
            selected.quantized = self.quantized.select_rows(index)
        return selected
