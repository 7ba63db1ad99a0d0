"""Quantized tokens stored in buffers that grow ahead of need, so that appending a block costs only that block.

A ``torch.cat`` of the whole quantized past on every append copies the context
each time (at long contexts that copy, not attention, was the cost of a decode
step). Here each tensor keeps its tokens in ``storage[:, :, start:end]`` with free
room after ``end``: an append writes into that room, forgetting old tokens
(sliding windows) moves ``start``, and only when the room runs out is everything
moved into a new buffer, larger by :data:`GROWTH` of the length. So each token is
copied a bounded number of times on average, and the unused room is at most
``GROWTH`` of the held length plus :data:`MIN_ROOM_TOKENS`; ``nbytes`` counts it,
since the cache does hold it.
"""

from __future__ import annotations

import torch

from intactkv_modifier.kv_quant.quantizer import QuantizedTensor
from intactkv_modifier.kv_quant.settings import TensorQuantSettings

__all__ = ["GROWTH", "MIN_ROOM_TOKENS", "GrowingTensor", "QuantizedStore"]

#: Room added when a buffer is reallocated, as a fraction of the length it then holds
GROWTH = 1 / 16
#: Room added at least, in tokens (short contexts would otherwise reallocate at every block)
MIN_ROOM_TOKENS = 256


class GrowingTensor:
    """A ``[batch, heads, length, ...]`` tensor that grows along axis 2 into reserved room.

    :param units_per_token: axis-2 entries per token (1, or ``1 / group_size`` for
        per-channel statistics: one row per block of tokens)
    """

    def __init__(self, first: torch.Tensor, units_per_token: float = 1.0):
        self.units_per_token = units_per_token
        self._reallocate(first.shape[2], first[:, :, :0])
        self.append(first)

    @property
    def view(self) -> torch.Tensor:
        return self.storage[:, :, self.start : self.end]

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def append(self, part: torch.Tensor) -> None:
        if self.end + part.shape[2] > self.storage.shape[2]:
            self._reallocate(self.length + part.shape[2], self.view)
        self.storage[:, :, self.end : self.end + part.shape[2]] = part
        self.end += part.shape[2]

    def drop_leading(self, units: int) -> None:
        """Forget the first ``units`` entries; their bytes are reused at the next reallocation."""
        self.start = min(self.end, self.start + units)

    def select_rows(self, index: torch.Tensor) -> GrowingTensor:
        return GrowingTensor(self.view.index_select(0, index), self.units_per_token)

    def _reallocate(self, needed: int, kept: torch.Tensor) -> None:
        room = max(int(needed * GROWTH), int(MIN_ROOM_TOKENS * self.units_per_token))
        storage = kept.new_empty((*kept.shape[:2], needed + room, *kept.shape[3:]))
        storage[:, :, : kept.shape[2]] = kept
        self.storage, self.start, self.end = storage, 0, kept.shape[2]


class QuantizedStore:
    """The codes, scales and minimums of a stream's quantized tokens, appended to block by block."""

    def __init__(self, first: QuantizedTensor):
        self.settings: TensorQuantSettings = first.settings
        statistics_per_token = 1 / first.settings.token_block
        self.codes = GrowingTensor(first.codes)
        self.scale = GrowingTensor(first.scale, statistics_per_token)
        self.minimum = GrowingTensor(first.minimum, statistics_per_token)
        self._tensor: QuantizedTensor | None = None  # read at every decode step of every layer: built once per change

    @property
    def num_tokens(self) -> int:
        return self.codes.length

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.minimum.nbytes

    def tensor(self) -> QuantizedTensor:
        """The stored tokens as a :class:`QuantizedTensor` of views (nothing copied)."""
        if self._tensor is None:
            self._tensor = QuantizedTensor(self.codes.view, self.scale.view, self.minimum.view, self.settings)
        return self._tensor

    def append(self, block: QuantizedTensor) -> None:
        self._tensor = None
        self.codes.append(block.codes)
        self.scale.append(block.scale)
        self.minimum.append(block.minimum)

    def drop_leading(self, tokens: int) -> None:
        """Forget the first ``tokens`` tokens (whole groups when grouped per channel)."""
        block = self.settings.token_block
        if tokens % block:
            raise ValueError(f"per_channel groups hold {block} tokens; cannot drop {tokens} tokens")
        self._tensor = None
        self.codes.drop_leading(tokens)
        self.scale.drop_leading(tokens // block)
        self.minimum.drop_leading(tokens // block)

    def select_rows(self, index: torch.Tensor) -> QuantizedStore:
        return QuantizedStore(self.tensor().select_rows(index))
