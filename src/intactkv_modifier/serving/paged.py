"""Where a request's prefix positions live in vLLM's paged KV cache, and which heads a rank holds.

vLLM addresses a token's K/V by a *slot*: ``kernel_block * kernel_block_size +
offset``. The scheduler hands out blocks of ``block_size`` tokens; an attention
backend may split each into ``block_size / kernel_block_size`` kernel blocks,
numbered consecutively (vLLM's ``BlockTable.map_to_kernel_blocks``). Slots are
what vLLM's own cache-store ops take, so the connector writes through them and
never through a layout of its own. With vLLM's hybrid KV-cache manager each
KV-cache group (Gemma 3: sliding-window layers, full-attention layers) gives a
request its own blocks; a sliding-window group holds no block for positions
that have left every future query's window, which a load marks :data:`NO_BLOCK`
and which get no slot.

Everything here is plain torch, so it is tested on the CPU without vLLM.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["NO_BLOCK", "PrefixLoad", "SlotIndices", "kv_head_slice", "layer_index_of", "slot_indices"]

#: A block id for positions vLLM keeps no K/V of in that KV-cache group (its null block): nothing is written there.
NO_BLOCK = -1

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class PrefixLoad:
    """Prefix positions ``[start, end)`` of one request, and the request's KV blocks (the scheduler's ids) in
    KV-cache group ``group``."""

    block_ids: tuple[int, ...]
    start: int
    end: int
    group: int = 0


@dataclass(frozen=True)
class SlotIndices:
    """One entry per prefix token to write: its cache slot, and the prefix position it holds."""

    slot_mapping: torch.Tensor
    positions: torch.Tensor

    def to(self, device: torch.device | str) -> SlotIndices:
        return SlotIndices(self.slot_mapping.to(device), self.positions.to(device))

    def __len__(self) -> int:
        return self.slot_mapping.numel()


def kv_head_slice(total_kv_heads: int, tp_rank: int, tp_size: int) -> slice:
    """The KV heads tensor-parallel rank ``tp_rank`` holds, by vLLM's ``QKVParallelLinear`` rule.

    With at least as many heads as ranks each rank holds a contiguous
    ``total / tp_size`` heads; with more ranks than heads each head is
    replicated on ``tp_size / total`` consecutive ranks.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor-parallel rank {tp_rank} is outside 0..{tp_size - 1}")
    if tp_size <= total_kv_heads:
        if total_kv_heads % tp_size:
            raise ValueError(f"{total_kv_heads} KV heads cannot be split over {tp_size} tensor-parallel ranks")
        per_rank = total_kv_heads // tp_size
        return slice(tp_rank * per_rank, (tp_rank + 1) * per_rank)
    if tp_size % total_kv_heads:
        raise ValueError(f"{total_kv_heads} KV heads cannot be replicated over {tp_size} tensor-parallel ranks")
    head = tp_rank // (tp_size // total_kv_heads)
    return slice(head, head + 1)


def layer_index_of(layer_name: str) -> int:
    """Decoder layer of an attention layer name such as ``model.layers.7.self_attn.attn``."""
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise ValueError(f"cannot tell the decoder layer of attention layer {layer_name!r}")
    return int(match.group(1))


def slot_indices(loads: Sequence[PrefixLoad], block_size: int, kernel_block_size: int) -> SlotIndices:
    """The cache slot of every prefix position in ``loads`` that a block holds, in vLLM's numbering."""
    if block_size % kernel_block_size:
        raise ValueError(f"KV block size {block_size} is not a multiple of the cache's block size {kernel_block_size}")
    per_block = block_size // kernel_block_size
    slots, positions = [], []
    for load in loads:
        if not 0 <= load.start <= load.end:
            raise ValueError(f"invalid prefix range [{load.start}, {load.end})")
        needed = -(-load.end // block_size)
        if needed > len(load.block_ids):
            raise ValueError(
                f"prefix positions up to {load.end} need {needed} KV blocks, the request has {len(load.block_ids)}"
            )
        position = torch.arange(load.start, load.end, dtype=torch.long)
        manager_block = torch.tensor(load.block_ids, dtype=torch.long)[position // block_size]
        held = manager_block != NO_BLOCK
        position, manager_block = position[held], manager_block[held]
        within = position % block_size
        kernel_block = manager_block * per_block + within // kernel_block_size
        slots.append(kernel_block * kernel_block_size + within % kernel_block_size)
        positions.append(position)
    if not positions:
        empty = torch.empty(0, dtype=torch.long)
        return SlotIndices(empty, empty)
    return SlotIndices(torch.cat(slots), torch.cat(positions))
