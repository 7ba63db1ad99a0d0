"""Triton kernel for a decode step's store into the static cache: the new token and the due block in one launch.

Through torch ops (:meth:`~intactkv_modifier.kv_quant.static_cache.StaticTokenStore.decode`)
a step writes the new token into the ring, quantizes the oldest exact block whether
or not it is due (a graph cannot skip work on a device value) and copies codes,
scales and minimums into place: compiled, about ten small kernels a layer, which on
an H200 cost a compiled step more than the quantized attention saves (the profile in
``benchmarks/results/gpu/static-kernel-profile/``). Here one program per row, KV head
and tensor (keys, values) writes the token and quantizes only when a block is due,
deciding on the device, so a CUDA graph replays the same single launch every step.

The arithmetic is :func:`~intactkv_modifier.kv_quant.quantizer.quantize`'s, operation
for operation in float32 (IEEE division, round half to even, the scale rounded to the
model dtype and up where that made it too small), so the codes are the same bits:
the tests compare every buffer with the torch path's.

A block of ``BLOCK`` tokens is held as ``[BLOCK, GROUPS, UNITS, UNIT_CODES]``: channel
``(g * UNITS + u) * UNIT_CODES + c``. Per-token groups are the ``GROUPS`` axis (their
statistics reduce over the last two axes); per-channel groups are the block's tokens
(``GROUPS`` is 1, statistics reduce over the first axis). A packing unit's codes shift
into one word along the last axis and leave as ``UNIT_BYTES`` bytes (see ``packing``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from intactkv_modifier.kv_quant.packing import packing_unit
from intactkv_modifier.kv_quant.settings import TensorQuantSettings

__all__ = ["store_decode_step"]

#: Added and subtracted, rounds a float32 in ``0 .. 2**22`` to an integer, ties to even (as ``torch.round``)
_ROUNDING = tl.constexpr(8388608.0)  # 2**23


@triton.jit
def _quantized_count(length, PREFIX: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """Quantized slots once a row holds ``length``: the static layer's ``quantized_tokens``."""
    return tl.maximum(length - PREFIX - RESIDUAL, 0) // BLOCK * BLOCK


@triton.jit
def _covering_scale(low, high, LEVELS: tl.constexpr, DTYPE: tl.constexpr, TINY: tl.constexpr):
    """``quantizer._covering_scale`` in float32: the model-dtype scale, one ulp up where rounding made it short."""
    exact = tl.math.div_rn(high - low, tl.full(high.shape, LEVELS, tl.float32))
    scale = tl.maximum(exact.to(DTYPE).to(tl.float32), TINY).to(DTYPE)
    if DTYPE.primitive_bitwidth == 16:  # the next value up: one more in the bits of a positive float
        rounded_up = (scale.to(tl.int16, bitcast=True) + 1).to(DTYPE, bitcast=True)
    else:
        rounded_up = (scale.to(tl.int32, bitcast=True) + 1).to(DTYPE, bitcast=True)
    return tl.where(scale.to(tl.float32) < exact, rounded_up, scale)


@triton.jit
def _store_tensor(
    states_ptr, s_row, s_head, s_channel,
    ring_ptr, r_row, r_head, r_token,
    codes_ptr, c_row, c_head, c_token,
    scale_ptr, min_ptr, st_row, st_head, st_index,
    row, head, length,
    PREFIX: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, RING: tl.constexpr,
    BITS: tl.constexpr, PER_TOKEN: tl.constexpr, GROUPS: tl.constexpr, UNITS: tl.constexpr,
    UNIT_CODES: tl.constexpr, UNIT_BYTES: tl.constexpr, TINY: tl.constexpr,
):
    """One row and KV head of keys or values: the token into its ring slot, then the due block, if any."""
    head_dim: tl.constexpr = GROUPS * UNITS * UNIT_CODES
    channels = tl.arange(0, head_dim)
    new_slot = (length - PREFIX) % RING
    states_ptr += row * s_row + head * s_head
    ring_ptr += row * r_row + head * r_head
    tl.store(ring_ptr + new_slot * r_token + channels, tl.load(states_ptr + channels * s_channel))
    before = _quantized_count(length, PREFIX, RESIDUAL, BLOCK)
    if _quantized_count(length + 1, PREFIX, RESIDUAL, BLOCK) > before:
        token = tl.arange(0, BLOCK)[:, None, None, None]
        unit = tl.arange(0, GROUPS)[:, None] * UNITS + tl.arange(0, UNITS)[None, :]  # [GROUPS, UNITS]
        channel_3d = unit[:, :, None] * UNIT_CODES + tl.arange(0, UNIT_CODES)[None, None, :]
        channel = channel_3d[None, :, :, :]
        slot = (before + token) % RING
        # this program's own ring store may not be visible to every thread yet: the new token from the states
        new = tl.load(states_ptr + channel * s_channel).to(tl.float32)
        block = tl.where(slot == new_slot, new, tl.load(ring_ptr + slot * r_token + channel).to(tl.float32))
        dtype = scale_ptr.dtype.element_ty
        levels: tl.constexpr = (1 << BITS) - 1
        statistics = row * st_row + head * st_head
        if PER_TOKEN:
            low = tl.min(tl.min(block, axis=3), axis=2)  # [BLOCK, GROUPS]
            high = tl.max(tl.max(block, axis=3), axis=2)
            scale = _covering_scale(low, high, levels, dtype, TINY)
            where = statistics + (before + tl.arange(0, BLOCK)[:, None]) * st_index + tl.arange(0, GROUPS)[None, :]
            tl.store(scale_ptr + where, scale)
            tl.store(min_ptr + where, low.to(dtype))
            low, scale = low[:, :, None, None], scale[:, :, None, None]
        else:
            low = tl.min(block, axis=0)  # [GROUPS, UNITS, UNIT_CODES]
            high = tl.max(block, axis=0)
            scale = _covering_scale(low, high, levels, dtype, TINY)
            where = statistics + (before // BLOCK) * st_index + channel_3d
            tl.store(scale_ptr + where, scale)
            tl.store(min_ptr + where, low.to(dtype))
            low, scale = low[None, :, :, :], scale[None, :, :, :]
        steps = tl.math.div_rn(block - low, scale.to(tl.float32))
        codes = tl.minimum(tl.maximum((steps + _ROUNDING) - _ROUNDING, 0.0), levels).to(tl.int32)
        shifts = tl.arange(0, UNIT_CODES)[None, None, None, :] * BITS
        words = tl.sum(codes << shifts, axis=3)  # disjoint bits: the sum is the or
        where = codes_ptr + row * c_row + head * c_head + (before + tl.arange(0, BLOCK))[:, None, None] * c_token
        for byte in tl.static_range(UNIT_BYTES):
            tl.store(where + unit[None, :, :] * UNIT_BYTES + byte, ((words >> (8 * byte)) & 255).to(tl.uint8))


@triton.jit
def _static_store_kernel(
    key_states_ptr, ks_row, ks_head, ks_channel,
    key_ring_ptr, kr_row, kr_head, kr_token,
    key_codes_ptr, kc_row, kc_head, kc_token,
    key_scale_ptr, key_min_ptr, kst_row, kst_head, kst_index,
    value_states_ptr, vs_row, vs_head, vs_channel,
    value_ring_ptr, vr_row, vr_head, vr_token,
    value_codes_ptr, vc_row, vc_head, vc_token,
    value_scale_ptr, value_min_ptr, vst_row, vst_head, vst_index,
    length_ptr, kv_heads,
    PREFIX: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, RING: tl.constexpr,
    TINY: tl.constexpr,
    KEY_BITS: tl.constexpr, KEY_PER_TOKEN: tl.constexpr, KEY_GROUPS: tl.constexpr, KEY_UNITS: tl.constexpr,
    KEY_UNIT_CODES: tl.constexpr, KEY_UNIT_BYTES: tl.constexpr,
    VALUE_BITS: tl.constexpr, VALUE_PER_TOKEN: tl.constexpr, VALUE_GROUPS: tl.constexpr, VALUE_UNITS: tl.constexpr,
    VALUE_UNIT_CODES: tl.constexpr, VALUE_UNIT_BYTES: tl.constexpr,
):
    program = tl.program_id(0)
    row, head = program // kv_heads, program % kv_heads
    length = tl.load(length_ptr).to(tl.int32)
    if tl.program_id(1) == 0:
        _store_tensor(
            key_states_ptr, ks_row, ks_head, ks_channel, key_ring_ptr, kr_row, kr_head, kr_token,
            key_codes_ptr, kc_row, kc_head, kc_token, key_scale_ptr, key_min_ptr, kst_row, kst_head, kst_index,
            row, head, length, PREFIX, RESIDUAL, BLOCK, RING,
            KEY_BITS, KEY_PER_TOKEN, KEY_GROUPS, KEY_UNITS, KEY_UNIT_CODES, KEY_UNIT_BYTES, TINY,
        )
    else:
        _store_tensor(
            value_states_ptr, vs_row, vs_head, vs_channel, value_ring_ptr, vr_row, vr_head, vr_token,
            value_codes_ptr, vc_row, vc_head, vc_token, value_scale_ptr, value_min_ptr, vst_row, vst_head, vst_index,
            row, head, length, PREFIX, RESIDUAL, BLOCK, RING,
            VALUE_BITS, VALUE_PER_TOKEN, VALUE_GROUPS, VALUE_UNITS, VALUE_UNIT_CODES, VALUE_UNIT_BYTES, TINY,
        )


def _tensor_constants(settings: TensorQuantSettings, head_dim: int) -> dict[str, int | bool]:
    """The block layout of one tensor (see the module docstring), unprefixed."""
    unit_codes, unit_bytes = packing_unit(settings.bits)
    per_token = settings.granularity == "per_token"
    groups = head_dim // settings.group_size if per_token else 1
    return dict(BITS=settings.bits, PER_TOKEN=per_token, GROUPS=groups, UNITS=head_dim // groups // unit_codes,
                UNIT_CODES=unit_codes, UNIT_BYTES=unit_bytes)


def _arguments(states: torch.Tensor, ring: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
               minimum: torch.Tensor) -> tuple[object, ...]:
    return (
        states, states.stride(0), states.stride(1), states.stride(3),
        ring, ring.stride(0), ring.stride(1), ring.stride(2),
        codes, codes.stride(0), codes.stride(1), codes.stride(2),
        scale, minimum, scale.stride(0), scale.stride(1), scale.stride(2),
    )


def store_decode_step(
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    key_buffers: tuple[torch.Tensor, ...],
    value_buffers: tuple[torch.Tensor, ...],
    length: torch.Tensor,
    settings: tuple[TensorQuantSettings, TensorQuantSettings],
    prefix: int,
    residual_length: int,
    block: int,
) -> None:
    """Store one decode step's ``[b, kv_heads, 1, d]`` keys and values at slot ``length`` (a device scalar, not yet
    advanced): ``*_buffers`` are a ``StaticTokenStore``'s ring, codes, scale and minimum, each contiguous.

    Only for the layouts :func:`~intactkv_modifier.kv_quant.fast_decode.static_kernel_store` lets through.
    """
    batch, kv_heads, _, head_dim = key_states.shape
    ring = key_buffers[0].shape[2]
    constants = {}
    for name, tensor_settings in zip(("KEY", "VALUE"), settings):
        constants |= {f"{name}_{key}": value for key, value in _tensor_constants(tensor_settings, head_dim).items()}
    _static_store_kernel[(batch * kv_heads, 2)](
        *_arguments(key_states, *key_buffers),
        *_arguments(value_states, *value_buffers),
        length, kv_heads,
        PREFIX=prefix, RESIDUAL=residual_length, BLOCK=block, RING=ring,
        TINY=torch.finfo(key_states.dtype).tiny,
        **constants,
    )
