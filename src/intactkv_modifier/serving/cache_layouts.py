"""How vLLM's attention backends arrange a layer's keys and values, read back slot by slot.

vLLM hands a KV connector each layer's cache as one tensor, but what its bytes
mean is the attention backend's business. The GPU backends (FlashAttention,
FlashInfer, Triton, FlexAttention) keep a token's key and value side by side in
the last dimension of a ``[blocks, heads, block_size, 2 * head_dim]`` view.
vLLM's CPU backend gives the same shape another meaning: per block and head,
all keys, then all values, each packed for the kernel of the CPU's instruction
set (keys transposed for the ``vec`` kernels; pairs of tokens or channels
interleaved for AMX tiles).

A layout here is a *reader* of one such arrangement. The connector writes the
prefix through the backend's own store op and reads it back with the reader:
the two agreeing, exactly, is the proof that the prefix sits where the
backend's attention will look. A backend or arrangement without a reader here
is refused, because bytes we cannot read back are bytes we cannot verify.

Plain torch: tested on the CPU without vLLM, and against vLLM's own store ops
where vLLM is installed (``tests/vllm/``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

__all__ = [
    "CPU_ISAS",
    "GPU_BACKENDS",
    "CacheLayout",
    "CpuAttentionLayout",
    "KeysBesideValues",
    "PackedSlots",
    "UnverifiableCacheError",
    "layout_for",
]

#: Backends whose cache is the logical ``[blocks, heads, block_size, 2 * head_dim]`` view, keys first.
GPU_BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION")
#: Instruction sets of vLLM's CPU attention whose packing is read here (``vllm/v1/attention/backends/cpu_attn.py``).
CPU_ISAS = ("vec", "vec16", "amx")
#: AMX tiles: 64-byte rows, so 16 key tokens per group and 16 value channels per group (bfloat16).
_AMX_KEY_TOKENS = 16
_AMX_VALUE_CHANNELS = 16


class UnverifiableCacheError(RuntimeError):
    """The connector cannot prove that the prefix it writes is what the attention backend reads."""


class CacheLayout(ABC):
    """Reads keys and values at cache slots, in the cache's own dtype (codes, for a quantized cache).

    Every arrangement read here is ``[kernel blocks, heads, block_size, ...]`` as a tensor, whatever it means inside.
    """

    name: str

    def blocks_of(self, cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """The distinct kernel blocks (first dimension of ``cache``) that ``slot_mapping`` touches."""
        return torch.unique(slot_mapping // cache.shape[2])

    @abstractmethod
    def read(self, cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[len(slot_mapping), heads, head_dim]`` held at ``slot_mapping``."""


def _blocks_and_offsets(slot_mapping: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return slot_mapping // block_size, slot_mapping % block_size


@dataclass(frozen=True)
class KeysBesideValues(CacheLayout):
    """``cache[block, head, offset]`` holds the token's key in its first half and its value in the second."""

    name: str = "keys beside values, [blocks, heads, block_size, 2 * head_dim]"

    def read(self, cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks, offsets = _blocks_and_offsets(slot_mapping, cache.shape[2])
        keys, values = cache[blocks, :, offsets].chunk(2, dim=-1)
        return keys, values


@dataclass(frozen=True)
class CpuAttentionLayout(CacheLayout):
    """vLLM's CPU attention: each ``(block, head)`` row holds ``block_size * head_dim`` keys, then as many values.

    ``vec``/``vec16`` keep keys as ``[head_dim, block_size]`` (transposed) and
    values as ``[block_size, head_dim]``. ``amx`` (bfloat16 only) keeps keys as
    ``[block_size/16, head_dim/2, 16, 2]`` (channel pairs of 16 tokens) and values
    as ``[head_dim/16, block_size/2, 16, 2]`` (token pairs of 16 channels).
    """

    isa: str
    name: str = "vLLM CPU attention"

    def __post_init__(self) -> None:
        if self.isa not in CPU_ISAS:
            raise UnverifiableCacheError(
                f"vLLM's CPU attention packs its cache for the {self.isa!r} instruction set, whose arrangement "
                f"IntactKV cannot read back (it reads {', '.join(CPU_ISAS)})"
            )

    def read(self, cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cache.dim() != 4 or cache.shape[3] % 2 or not cache.is_contiguous():
            raise UnverifiableCacheError(
                f"a CPU attention cache of shape {tuple(cache.shape)} and strides {cache.stride()} is not the "
                "contiguous [blocks, heads, block_size, 2 * head_dim] tensor vLLM's CPU backend allocates"
            )
        num_blocks, heads, block, twice_dim = cache.shape
        dim = twice_dim // 2
        blocks, offsets = _blocks_and_offsets(slot_mapping, block)
        if self.isa != "amx":
            keys = cache.view(num_blocks, heads, 2, dim, block).select(2, 0)[blocks, :, :, offsets]
            values = cache.view(num_blocks, heads, 2, block, dim).select(2, 1)[blocks, :, offsets]
            return keys, values
        if cache.element_size() != 2 or block % _AMX_KEY_TOKENS or dim % _AMX_VALUE_CHANNELS:
            raise UnverifiableCacheError(
                f"vLLM's AMX attention cache of dtype {cache.dtype}, block size {block} and head size {dim} is "
                "not the bfloat16 tile packing IntactKV reads"
            )
        key_tiles = cache.view(num_blocks, heads, 2, block // _AMX_KEY_TOKENS, dim // 2, _AMX_KEY_TOKENS, 2)
        keys = key_tiles.select(2, 0)[blocks, :, offsets // _AMX_KEY_TOKENS, :, offsets % _AMX_KEY_TOKENS]
        value_tiles = cache.view(num_blocks, heads, 2, dim // _AMX_VALUE_CHANNELS, block // 2, _AMX_VALUE_CHANNELS, 2)
        values = value_tiles.select(2, 1)[blocks, :, :, offsets // 2, :, offsets % 2]
        count = slot_mapping.numel()
        return keys.reshape(count, heads, dim), values.reshape(count, heads, dim)


@dataclass(frozen=True)
class PackedSlots(CacheLayout):
    """One byte string per token and head: ``cache[block, head, offset]`` is ``[key bytes | value bytes | padding]``.

    vLLM's TurboQuant backend (``turboquant_*`` cache dtypes) hands out a
    ``uint8`` cache of logical shape ``[blocks, heads, block_size, slot_bytes]``
    and its kernels address ``cache.transpose(1, 2)`` by ``(block, offset,
    head)``: the same byte string as ``cache[block, head, offset]`` here,
    whatever the physical strides. The key's packed code comes first
    (``key_bytes``), the value's next (``value_bytes``); the padding byte that
    rounds the slot to an even size is never written, so it is not read.
    """

    key_bytes: int
    value_bytes: int
    name: str = "TurboQuant packed slots, [blocks, heads, block_size, slot_bytes]"

    def read(self, cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cache.dim() != 4 or cache.element_size() != 1 or cache.shape[3] < self.key_bytes + self.value_bytes:
            raise UnverifiableCacheError(
                f"a cache of shape {tuple(cache.shape)} and dtype {cache.dtype} is not the byte-per-element "
                f"[blocks, heads, block_size, >= {self.key_bytes + self.value_bytes}] tensor of packed slots"
            )
        blocks, offsets = _blocks_and_offsets(slot_mapping, cache.shape[2])
        slots = cache[blocks, :, offsets]
        return slots[..., : self.key_bytes], slots[..., self.key_bytes : self.key_bytes + self.value_bytes]


def layout_for(backend_name: str, cpu_isa: str | None = None) -> CacheLayout:
    """The reader for an attention backend (as ``AttentionBackend.get_name()`` names it)."""
    if backend_name in GPU_BACKENDS:
        return KeysBesideValues()
    if backend_name == "CPU_ATTN":
        if cpu_isa is None:
            raise UnverifiableCacheError("vLLM's CPU attention did not say which instruction set packs its cache")
        return CpuAttentionLayout(cpu_isa)
    raise UnverifiableCacheError(
        f"attention backend {backend_name} keeps its KV cache in an arrangement IntactKV cannot read back "
        f"(it reads {', '.join((*GPU_BACKENDS, 'CPU_ATTN'))})"
    )
