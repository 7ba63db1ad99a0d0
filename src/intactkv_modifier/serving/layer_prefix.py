"""One attention layer's stored prefix: written through vLLM's own cache store, then read back and compared.

The store is the attention backend's ``do_kv_cache_update`` (what vLLM itself
calls for every computed token), so the bytes land in whatever arrangement and
format the backend uses, fp8 included. Whether they are the right bytes is
checked by reading them back with the backend's :class:`CacheLayout` and
comparing with what the cache must hold: bit for bit in an unquantized cache;
in an fp8 cache, each code one of the two fp8 values around ``stored / scale``
(vLLM's kernels differ in how they round: its CPU store rounds toward zero,
torch to nearest). Any difference stops the engine
(:class:`UnverifiableCacheError`); a cache is never left holding bytes that
were not proven.

vLLM-free: the connector passes the store in, and the tests pass vLLM's real
store ops (``tests/vllm/``) or plain torch ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from intactkv_modifier.serving.cache_layouts import CacheLayout, UnverifiableCacheError
from intactkv_modifier.serving.paged import SlotIndices

__all__ = ["FP8_CACHE_DTYPES", "CacheStore", "LayerPrefix", "PrefixWriter", "attention_store", "cache_codes"]

#: ``store(keys, values, slot_mapping)``: write ``[n, heads, head_dim]`` keys and values into the layer's cache.
CacheStore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]

#: vLLM's ``--kv-cache-dtype`` names of fp8 caches, and the fp8 format of their codes.
FP8_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_SAME_SIZE_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
_FP8_SIGN, _FP8_MAGNITUDE = 0x80, 0x7F


def cache_codes(stored: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """What a ``cache_dtype`` cache holds for ``stored``: the values themselves, or fp8 codes of ``stored / scale``."""
    if cache_dtype in FP8_CACHE_DTYPES.values():
        return (stored.float() / scale).to(cache_dtype)
    return stored.to(cache_dtype)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so that comparing them is exact for every float format (NaN and -0.0 included)."""
    return tensor.contiguous().view(_SAME_SIZE_INTEGER[tensor.element_size()])


def _fp8_order(codes: torch.Tensor) -> torch.Tensor:
    """fp8 codes (sign and magnitude) as integers in the order of their values: neighbours differ by one."""
    raw = _bits(codes).int()
    magnitude = raw & _FP8_MAGNITUDE
    return torch.where(raw & _FP8_SIGN > 0, -magnitude, magnitude)


def attention_store(attention: Any, cache: torch.Tensor) -> CacheStore:
    """The store vLLM writes every computed token of ``attention``'s layer with (its backend's
    ``do_kv_cache_update``), aimed at ``cache``: the layer's own cache, or a scratch one to compare with."""

    def store(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        attention.impl.do_kv_cache_update(attention, key, value, cache, slot_mapping)

    return store

def _mismatches(got: torch.Tensor, want: torch.Tensor) -> int:
    """Elements of ``got`` that are not ``want``'s: bit for bit, or for fp8 codes farther than one code step."""
    if want.dtype in FP8_CACHE_DTYPES.values():
        return int(((_fp8_order(got) - _fp8_order(want)).abs() > 1).sum())
    return int((_bits(got) != _bits(want)).sum())


@dataclass
class PrefixWriter(ABC):
    """The prefix rows one rank writes into one attention layer's cache, and how to prove them.

    ``keys``/``values`` are ``[prefix_length, heads of this rank, head_dim]`` in
    the dtype the model computes K/V in (the store's input).
    """

    name: str
    cache: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    store: CacheStore
    layout: CacheLayout

    @abstractmethod
    def expected(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache must hold for the prefix keys and values at ``positions``, as the layout reads them."""

    def write(self, slots: SlotIndices) -> None:
        if len(slots):
            self.store(self.keys[slots.positions], self.values[slots.positions], slots.slot_mapping)

    def verify(self, slots: SlotIndices) -> None:
        """Read ``slots`` back the way the backend arranges them; raise unless every bit is the prefix's."""
        if not len(slots):
            return
        keys, values = self.layout.read(self.cache, slots.slot_mapping)
        want_keys, want_values = self.expected(slots.positions)
        for kind, got, want in (("keys", keys, want_keys), ("values", values, want_values)):
            if got.shape != want.shape or got.element_size() != want.element_size():
                detail = f"read {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} {want.dtype}"
            elif mismatches := _mismatches(got, want):
                detail = f"{mismatches} of {want.numel()} values differ"
            else:
                continue
            raise UnverifiableCacheError(
                f"{self.name}: the prefix {kind} read back from the cache ({self.layout.name}) are not the stored "
                f"ones: {detail}"
            )

    def self_test(self, slots: SlotIndices) -> None:
        """Write the whole prefix at ``slots`` of free blocks, prove it, and put the blocks' bytes back."""
        blocks = self.layout.blocks_of(self.cache, slots.slot_mapping)
        saved = self.cache[blocks].clone()
        try:
            self.write(slots)
            self.verify(slots)
        finally:
            self.cache[blocks] = saved


@dataclass
class LayerPrefix(PrefixWriter):
    """A prefix whose cache codes are known up front: ``expected_keys``/``expected_values`` (:func:`cache_codes`)."""

    expected_keys: torch.Tensor
    expected_values: torch.Tensor

    def expected(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.expected_keys[positions], self.expected_values[positions]
