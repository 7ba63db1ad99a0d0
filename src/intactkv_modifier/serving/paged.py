"""Moving the stored prefix K/V into vLLM's paged KV cache, block by block.

vLLM (0.26 through 0.33 at least) hands each attention layer's cache to a KV
connector as the *logical* view ``[num_blocks, num_kv_heads, block_size,
2 * head_dim]``: keys in the first ``head_dim`` channels, values in the rest,
whatever the physical order (NHD or HND) its strides encode. Writing through
that view is therefore correct for every physical layout; this module only
decides which (block, offset) slot each prefix position goes to, and which
heads a tensor-parallel rank holds.

Everything here is plain torch, so it is tested on the CPU without vLLM.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "PrefixLoad",
    "SlotIndices",
    "check_cache_layout",
    "kv_head_slice",
    "layer_index_of",
    "pack_layer",
    "slot_indices",
    "write_prefix",
]

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class PrefixLoad:
    """Prefix positions ``[start, end)`` of one request, and the request's KV blocks (the scheduler's ids)."""

    block_ids: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SlotIndices:
    """One entry per loaded token: the cache block, the offset inside it, and the prefix position it holds."""

    blocks: torch.Tensor
    offsets: torch.Tensor
    positions: torch.Tensor

    def to(self, device: torch.device | str) -> SlotIndices:
        return SlotIndices(
            blocks=self.blocks.to(device, non_blocking=True),
            offsets=self.offsets.to(device, non_blocking=True),
            positions=self.positions.to(device, non_blocking=True),
        )

    def __len__(self) -> int:
        return self.blocks.numel()


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


def pack_layer(key: torch.Tensor, value: torch.Tensor, heads: slice) -> torch.Tensor:
    """``[H, P, D]`` keys and values -> ``[P, H_rank, 2D]``, the per-token rows the cache holds."""
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"keys {tuple(key.shape)} and values {tuple(value.shape)} must both be [heads, tokens, dim]")
    return torch.cat([key[heads], value[heads]], dim=-1).transpose(0, 1).contiguous()


def slot_indices(loads: Sequence[PrefixLoad], block_size: int, kernel_block_size: int) -> SlotIndices:
    """Where each loaded prefix position lives in the cache tensors.

    ``block_size`` is the scheduler's block size; the attention kernel may split
    each of its blocks into ``block_size / kernel_block_size`` cache blocks,
    numbered consecutively (vLLM's ``BlockTable.map_to_kernel_blocks``).
    """
    if block_size % kernel_block_size:
        raise ValueError(f"KV block size {block_size} is not a multiple of the cache's block size {kernel_block_size}")
    per_block = block_size // kernel_block_size
    blocks, offsets, positions = [], [], []
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
        within = position % block_size
        blocks.append(manager_block * per_block + within // kernel_block_size)
        offsets.append(within % kernel_block_size)
        positions.append(position)
    if not positions:
        empty = torch.empty(0, dtype=torch.long)
        return SlotIndices(empty, empty, empty)
    return SlotIndices(torch.cat(blocks), torch.cat(offsets), torch.cat(positions))


def check_cache_layout(cache: torch.Tensor, packed: torch.Tensor) -> None:
    """Refuse a cache that is not ``[blocks, H_rank, block, 2D]``, rather than scatter into the wrong channels."""
    if cache.dim() != 4 or cache.shape[1] != packed.shape[1] or cache.shape[3] != packed.shape[2]:
        raise ValueError(
            f"KV cache of shape {tuple(cache.shape)} is not [blocks, {packed.shape[1]} heads, block size, "
            f"{packed.shape[2]}] (keys and values packed in the last dimension); this vLLM's cache layout is "
            "not supported by IntactKV serving."
        )


def write_prefix(cache: torch.Tensor, packed: torch.Tensor, slots: SlotIndices) -> None:
    """Write prefix rows ``packed[positions]`` into ``cache`` ``[blocks, H, block, 2D]`` at ``slots``.

    One scatter per layer whatever the number of requests, so a step that loads
    the prefix for many requests costs one small kernel per layer.
    """
    check_cache_layout(cache, packed)
    if len(slots):
        cache[slots.blocks, :, slots.offsets] = packed[slots.positions].to(cache.dtype)
