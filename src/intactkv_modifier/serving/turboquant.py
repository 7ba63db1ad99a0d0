"""The stored prefix in vLLM's TurboQuant KV cache (``--kv-cache-dtype turboquant_*``), proven two ways.

TurboQuant keeps one byte string per token and head (:class:`PackedSlots`):
the key as fp8 (``turboquant_k8v4``) or as a norm plus Lloyd–Max codebook
indices of the Hadamard-rotated unit key (the ``_nc`` presets, 3 or 4 bits),
then the value as 3- or 4-bit uniform codes with an fp16 scale and zero. Its
codes are not a plain cast of the stored K/V, so the connector proves a write
twice, both times with vLLM's own kernels:

- **Placement, exactly.** The same rows are stored by the same
  ``do_kv_cache_update`` into a scratch cache of a few blocks; the bytes at the
  prefix's slots of the real cache must equal the scratch bytes, bit for bit.
  That proves the slots and that nothing overwrote them, whatever the codes
  mean. The scratch store gets exactly the rows of the write it checks, so a
  GEMM that rounds differently for another row count cannot make it differ.
- **Meaning, within the format's error.** The real cache is decoded with
  ``_tq_full_dequant_kv`` and the inverse rotation, as vLLM's continuation
  prefill does, and compared with the stored K/V (:func:`decoded_mismatch`
  states the bounds). Reading another token's or head's bytes breaks them.

Imports vLLM, so only the connector imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.triton_utils import triton
from vllm.v1.attention.ops.triton_turboquant_decode import _tq_full_dequant_kv, _use_fp8_e4b15

from intactkv_modifier.serving.cache_layouts import PackedSlots, UnverifiableCacheError
from intactkv_modifier.serving.layer_prefix import PrefixWriter, attention_store
from intactkv_modifier.serving.paged import SlotIndices

__all__ = ["TURBOQUANT_BACKEND", "TurboQuantPrefix", "decoded_mismatch", "turboquant_prefix"]

#: ``AttentionBackend.get_name()`` of vLLM's TurboQuant backend.
TURBOQUANT_BACKEND = "TURBOQUANT"
#: fp16 keeps 11 significant bits: every fp16 rounding on the way (stored norm, scale, zero, the decoded output,
#: the fp16 Hadamard matrix and its product) moves a value by at most 2^-11 of its size. Each bound below allows
#: several times the sum of those roundings; a misread token or head is off by the size of the value itself.
_FP16_SLACK = 2.0**-8
#: An e4m3 fp8 code is within half a step of its value: 2^-4 of it for normal numbers, 2^-10 absolute below.
_FP8_RELATIVE, _FP8_ABSOLUTE = 2.0**-4, 2.0**-10


@dataclass
class TurboQuantPrefix(PrefixWriter):
    """A layer's prefix in a TurboQuant cache; ``attention`` is vLLM's attention layer (its impl does the work)."""

    attention: Any

    def expected(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bytes vLLM's store writes for these rows, stored in one call into a scratch cache."""
        count, block = positions.numel(), self.cache.shape[2]
        scratch = self.cache.new_zeros((-(-count // block), *self.cache.shape[1:]))
        slots = torch.arange(count, device=self.cache.device)
        attention_store(self.attention, scratch)(self.keys[positions], self.values[positions], slots)
        return self.layout.read(scratch, slots)

    def verify(self, slots: SlotIndices) -> None:
        """Bit-exact against the scratch store, then decoded with vLLM's reader within the format's error."""
        super().verify(slots)
        if not len(slots):
            return
        keys, values = self.decode(slots.slot_mapping)
        if detail := decoded_mismatch(
            self.keys[slots.positions], self.values[slots.positions], keys, values, self.attention
        ):
            raise UnverifiableCacheError(f"{self.name}: the prefix decoded from the TurboQuant cache {detail}")

    def decode(self, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[len(slot_mapping), heads, head_dim]`` at the slots, decoded the way vLLM's
        continuation prefill does (``TurboQuantAttentionImpl._continuation_prefill``)."""
        impl, config = self.attention.impl, self.attention.impl.tq_config
        _, heads, block, _ = self.cache.shape
        dim = impl.head_size
        blocks = torch.unique(slot_mapping // block)
        block_table = blocks.to(torch.int32)[None]
        length = blocks.numel() * block
        keys = torch.empty(1, heads, length, dim, dtype=torch.float16, device=self.cache.device)
        values = torch.empty_like(keys)
        cache = self.cache.transpose(1, 2)  # vLLM's kernels address (block, offset, head), as do_kv_cache_update
        _tq_full_dequant_kv[(length, heads)](
            cache, block_table, self.attention._tq_centroids, keys, values,
            keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
            cache.stride(0), cache.stride(1), cache.stride(2), block_table.stride(0),
            HEAD_DIM=dim, BLOCK_SIZE=block, NUM_KV_HEADS=heads, MSE_BYTES=impl._mse_bytes,
            KPS=config.key_packed_size, VQB=config.effective_value_quant_bits, VAL_DATA_BYTES=impl._val_data_bytes,
            MSE_BITS=config.key_mse_bits, KEY_FP8=int(config.key_fp8), BLOCK_D=triton.next_power_of_2(dim),
            NORM_CORRECTION=int(config.norm_correction), FP8_E4B15=_use_fp8_e4b15(self.cache.device.index or 0),
            num_warps=4,
        )  # fmt: skip
        rows = torch.searchsorted(blocks, slot_mapping // block) * block + slot_mapping % block
        keys, values = keys[0, :, rows].transpose(0, 1), values[0, :, rows].transpose(0, 1)
        if not config.key_fp8:
            keys = (keys.reshape(-1, dim) @ self.attention._tq_Pi_half).reshape(keys.shape)
        return keys.float(), values.float()


def turboquant_prefix(
    name: str, cache: torch.Tensor, attention: Any, keys: torch.Tensor, values: torch.Tensor
) -> TurboQuantPrefix:
    """The prefix writer of a TurboQuant layer: vLLM's store, its packed-slot arrangement, its decoder."""
    impl = attention.impl
    if getattr(impl, "_soa_store", False):
        raise UnverifiableCacheError(
            f"{name}: vLLM's TurboQuant stores this layer's cache in its structure-of-arrays arrangement (FlyDSL "
            "decode on ROCm), which IntactKV cannot read back"
        )
    impl._ensure_on_device(attention, cache.device)  # vLLM's one-time rotation and codebook for the layer
    config = impl.tq_config
    layout = PackedSlots(config.key_packed_size, config.value_packed_size)
    if cache.shape[3] < layout.key_bytes + layout.value_bytes or cache.element_size() != 1:
        raise UnverifiableCacheError(
            f"{name}: the TurboQuant cache {tuple(cache.shape)} {cache.dtype} is not the byte tensor of "
            f"{layout.key_bytes + layout.value_bytes}-byte slots its {impl.kv_cache_dtype} config describes"
        )

    return TurboQuantPrefix(name, cache, keys, values, attention_store(attention, cache), layout, attention)


def decoded_mismatch(
    keys: torch.Tensor, values: torch.Tensor, decoded_keys: torch.Tensor, decoded_values: torch.Tensor, attention: Any
) -> str | None:
    """Why the decoded K/V are not the stored ones within the format's error, or ``None`` when they are.

    Bounds, per token and head (``[n, heads, head_dim]`` tensors):

    - **Values** (uniform codes, ``b`` bits): the code is ``round((v - min) /
      step)`` with ``step = (max - min) / (2^b - 1)``, so each value is within
      ``step / 2``, plus the fp16 roundings of scale, zero and output.
    - **fp8 keys** (``k8v4``): half an e4m3 step, 2^-4 of the value (2^-10
      below the normal range).
    - **Codebook keys**: in the rotated unit domain ``y = (k / |k|) H`` every
      coordinate goes to its nearest Lloyd–Max centroid, so it moves by at most
      half the widest gap between centroids, or by ``|y_i| - c_max`` beyond the
      outermost one. Norm correction then divides the centroid vector by its
      norm ``r``, moving coordinate ``i`` by at most ``|ŷ_i| · |1 - r|``, and
      ``|1 - r| <= |ĉ - y|`` (``|y| = 1``), the norm of the per-coordinate
      bounds. Comparing per coordinate keeps the bound tight enough that a key
      read from the wrong slot fails it.
    """
    config = attention.impl.tq_config
    keys, values = keys.float(), values.float()
    low, high = values.amin(-1, keepdim=True), values.amax(-1, keepdim=True)
    step = (high - low) / (2**config.effective_value_quant_bits - 1)
    value_bound = step / 2 + _FP16_SLACK * (values.abs().amax(-1, keepdim=True) + high - low)
    problems = []
    if (bad := int(((decoded_values - values).abs() > value_bound).sum())) or not decoded_values.isfinite().all():
        problems.append(f"{bad} value elements farther than half a quantization step from the stored values")
    if config.key_fp8:
        key_bound = _FP8_RELATIVE * keys.abs() * (1 + _FP16_SLACK) + _FP8_ABSOLUTE
        error = (decoded_keys - keys).abs()
    else:
        rotation = attention._tq_Pi.float()
        norms = keys.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        unit, decoded_unit = keys / norms @ rotation, decoded_keys / norms @ rotation
        centroids = attention._tq_centroids.float().sort().values
        half_gap = float((centroids[1:] - centroids[:-1]).max()) / 2
        cell = torch.maximum(unit.abs() - centroids.abs().max(), torch.tensor(half_gap))
        key_bound = cell + _FP16_SLACK
        if config.norm_correction:
            key_bound = key_bound + decoded_unit.abs() * cell.norm(dim=-1, keepdim=True)
        error = (decoded_unit - unit).abs()
    if (bad := int((error > key_bound).sum())) or not decoded_keys.isfinite().all():
        bits = 8 if config.key_fp8 else config.key_mse_bits
        problems.append(f"{bad} key elements outside the {bits}-bit key format's error bound around the stored keys")
    return f"has {' and '.join(problems)}" if problems else None

