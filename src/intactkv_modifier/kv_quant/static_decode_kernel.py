"""Triton kernels for one decode step over the static cache's buffers: a launch that CUDA graphs can replay.

The static cache (:mod:`~intactkv_modifier.kv_quant.static_cache`) keeps a
row's past in buffers whose shapes never change: the exact prefix, the quantized
region and the ring of newest exact tokens; how many slots are quantized and how
many ring slots are filled live in device tensors. These kernels run the dynamic
decode kernels' tiles and running softmax
(:mod:`~intactkv_modifier.kv_quant.decode_kernel`) with those two counts loaded
on the device instead of passed from the host, so every step launches the same
grid with the same arguments: the quantized region's whole capacity is split
across programs (flash-decoding; a program past the filled slots stores an empty
partial result), and the codes are read where they are stored. Compiled, that
replaces reading every slot of ``max_cache_len`` through a dequantized copy, which
made the compiled static cache slower than the compiled full-precision one.

Two launches a layer: the partials kernel, whose last split of each KV head
attends the exact tokens (prefix, ring) while the others attend the codes, and a
merge with one program per query that folds every partial result at once. The
dynamic kernels' merge walks the partial results one at a time in one program per
KV head behind the exact tokens: at 16K tokens and batch 1 that chain of
dependent loads took a third of the attention's time on an H200, and it grows
with the number of splits, which kept the partials at too few programs to hide
the memory's latency.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from intactkv_modifier.kv_quant.decode_kernel import (
    MASKED,
    attend_tile,
    launch_settings,
    load_query,
    partial_buffers,
    quantized_arguments,
    quantized_constants,
    quantized_tiles,
    split_plan,
    store_partials,
)
from intactkv_modifier.kv_quant.quantizer import QuantizedTensor

__all__ = ["static_kernel_attention"]

#: Programs attending quantized slots to aim for, with their warps: the fastest launch of
#: ``benchmarks/static_kernel_sweep.py`` at 16K tokens, batch 1, 8 KV heads on an H200 (39.9 µs a layer against
#: 50.7 at the dynamic kernel's 264 programs of 4 warps); twice the dynamic kernel's programs, as the merge no
#: longer grows with them. With the tiles' side-by-side code loads 25.7 µs here; swept again, 1056 programs took
#: 24.3 µs alone but decoded no faster end to end (486.5 against 489.2 tok/s), so this launch stays
TARGET_PROGRAMS = 528
NUM_WARPS = 2
#: Exact tokens (prefix, ring) a step of the exact split's loops attends
EXACT_TILE = 16
#: Partial results a step of the merge's loop weighs and sums (``[MERGE_TILE, head_dim]`` floats in registers)
MERGE_TILE = 32


@triton.jit
def _exact_tiles(
    query, keys_ptr, values_ptr, token_stride, first_slot, count, slots, first_column, mask_ptr, mask_column,
    scaling, running_max, running_sum, accumulated,
    HEAD_DIM: tl.constexpr, TILE: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
):
    """``count`` exact tokens from slot ``first_slot`` of a buffer of ``slots`` (wrapping: the ring), into the
    running softmax; token ``j`` is mask column ``first_column + j``."""
    channels = tl.arange(0, HEAD_DIM)
    for tile_start in range(0, count, TILE):
        token = tile_start + tl.arange(0, TILE)
        valid = token < count
        offsets = ((first_slot + token) % slots)[:, None] * token_stride + channels[None, :]
        keys = tl.load(keys_ptr + offsets, mask=valid[:, None], other=0.0)
        values = tl.load(values_ptr + offsets, mask=valid[:, None], other=0.0)
        running_max, running_sum, accumulated = attend_tile(
            query, keys, values, valid, mask_ptr, mask_column, first_column + token, scaling,
            running_max, running_sum, accumulated, MASK_KIND, PRECISION,
        )
    return running_max, running_sum, accumulated


@triton.jit
def _static_partials_kernel(
    query_ptr, q_row, q_head, q_group,
    key_codes_ptr, kc_row, kc_head, kc_token,
    key_scale_ptr, key_min_ptr, ks_row, ks_head, ks_block,
    value_codes_ptr, vc_row, vc_head, vc_token,
    value_scale_ptr, value_min_ptr, vs_row, vs_head, vs_token,
    prefix_keys_ptr, prefix_values_ptr, prefix_row, prefix_head, prefix_token,
    ring_keys_ptr, ring_values_ptr, ring_row, ring_head, ring_token,
    mask_ptr, mask_row, mask_column,
    quantized_ptr, ring_tokens_ptr,
    partial_out_ptr, partial_max_ptr, partial_sum_ptr,
    kv_heads, tokens_per_split, splits, scaling,
    PREFIX: tl.constexpr, PREFIX_SLOTS: tl.constexpr, RING: tl.constexpr, GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr, EXACT_TILE: tl.constexpr,
    KEY_BITS: tl.constexpr, KEY_GROUP: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_GROUP: tl.constexpr,
    MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
):
    """Splits ``0 .. splits - 1`` of a KV head attend its quantized slots, split ``splits`` its exact tokens."""
    program, split = tl.program_id(0), tl.program_id(1)
    row, head = program // kv_heads, program % kv_heads
    query = load_query(query_ptr, row, head, q_row, q_head, q_group, GROUP, GROUP_PAD, HEAD_DIM)
    quantized = tl.load(quantized_ptr).to(tl.int32)
    mask_ptr += row * mask_row
    if split < splits:
        begin = split * tokens_per_split
        running_max, running_sum, accumulated = quantized_tiles(
            query, row, head, begin, tl.minimum(begin + tokens_per_split, quantized), 0, PREFIX,
            key_codes_ptr, kc_row, kc_head, kc_token, key_scale_ptr, key_min_ptr, ks_row, ks_head, ks_block,
            value_codes_ptr, vc_row, vc_head, vc_token, value_scale_ptr, value_min_ptr, vs_row, vs_head, vs_token,
            mask_ptr, mask_column, scaling,
            GROUP_PAD, HEAD_DIM, TILE, KEY_BITS, KEY_GROUP, VALUE_BITS, VALUE_GROUP, MASK_KIND, PRECISION,
        )
    else:
        running_max = tl.full([GROUP_PAD], MASKED, tl.float32)
        running_sum = tl.zeros([GROUP_PAD], tl.float32)
        accumulated = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        prefix = row * prefix_row + head * prefix_head
        running_max, running_sum, accumulated = _exact_tiles(
            query, prefix_keys_ptr + prefix, prefix_values_ptr + prefix, prefix_token, 0, PREFIX, PREFIX_SLOTS, 0,
            mask_ptr, mask_column, scaling, running_max, running_sum, accumulated,
            HEAD_DIM, EXACT_TILE, MASK_KIND, PRECISION,
        )
        ring = row * ring_row + head * ring_head
        running_max, running_sum, accumulated = _exact_tiles(
            query, ring_keys_ptr + ring, ring_values_ptr + ring, ring_token, quantized % RING,
            tl.load(ring_tokens_ptr).to(tl.int32), RING, PREFIX + quantized,
            mask_ptr, mask_column, scaling, running_max, running_sum, accumulated,
            HEAD_DIM, EXACT_TILE, MASK_KIND, PRECISION,
        )
    store_partials(partial_out_ptr, partial_max_ptr, partial_sum_ptr, program * (splits + 1) + split,
                   running_max, running_sum, accumulated, GROUP_PAD, HEAD_DIM, GROUP)


@triton.jit
def _static_merge_kernel(
    partial_out_ptr, partial_max_ptr, partial_sum_ptr,
    out_ptr, o_row, o_head, o_group,
    kv_heads, partials,
    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PARTIALS_PAD: tl.constexpr, MERGE_TILE: tl.constexpr,
):
    """One query's ``partials`` results: the largest maximum first (all at once), then the weighted sums; no
    step waits for another's loads."""
    program, query_row = tl.program_id(0), tl.program_id(1)
    row, head = program // kv_heads, program % kv_heads
    first = program * partials
    every = tl.arange(0, PARTIALS_PAD)
    largest = tl.max(tl.load(partial_max_ptr + (first + every) * GROUP_PAD + query_row, mask=every < partials,
                             other=MASKED), axis=0)
    channels = tl.arange(0, HEAD_DIM)
    total = tl.zeros([MERGE_TILE], tl.float32)
    accumulated = tl.zeros([MERGE_TILE, HEAD_DIM], tl.float32)
    for tile_start in range(0, partials, MERGE_TILE):
        index = tile_start + tl.arange(0, MERGE_TILE)
        present = index < partials
        slot = (first + index) * GROUP_PAD + query_row
        weight = tl.where(present, tl.exp(tl.load(partial_max_ptr + slot, mask=present, other=MASKED) - largest), 0.0)
        total += weight * tl.load(partial_sum_ptr + slot, mask=present, other=0.0)
        partial = tl.load(partial_out_ptr + slot[:, None] * HEAD_DIM + channels[None, :], mask=present[:, None],
                          other=0.0)
        accumulated += weight[:, None] * partial
    output = tl.sum(accumulated, axis=0) / tl.sum(total, axis=0)
    tl.store(out_ptr + row * o_row + head * o_head + query_row * o_group + channels,
             output.to(out_ptr.dtype.element_ty))


def static_kernel_attention(
    query: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor],
    quantized: tuple[QuantizedTensor, QuantizedTensor],
    ring: tuple[torch.Tensor, torch.Tensor],
    quantized_tokens: torch.Tensor,
    ring_tokens: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    tile: int | None = None,
    target_programs: int = TARGET_PROGRAMS,
    num_warps: int = NUM_WARPS,
    exact_tile: int = EXACT_TILE,
) -> torch.Tensor:
    """Attention of one query token per row over a static cache layer; ``[b, kv_heads, group, d]`` -> the same shape.

    The launch's tuning, measured by ``benchmarks/static_kernel_sweep.py`` (powers of two): ``tile`` quantized
    tokens per step of a partials program's loop (at least 16; by default the dynamic kernel's, within a key
    group), ``target_programs`` programs attending the quantized slots to aim for, their ``num_warps``,
    ``exact_tile`` prefix or ring tokens per step.

    :param prefix: the exact prefix keys and values ``[b, kv_heads, prefix, d]`` (slots ``0 .. prefix - 1``)
    :param quantized: the keys' and values' whole quantized regions (capacity); slot ``i`` is position
        ``prefix + i``, attended below ``quantized_tokens``
    :param ring: the exact newest keys and values ``[b, kv_heads, ring, d]``: position ``prefix + i`` at slot
        ``i % ring`` for ``quantized_tokens <= i < quantized_tokens + ring_tokens``
    :param quantized_tokens: device scalar, quantized slots attended
    :param ring_tokens: device scalar, ring slots attended (the new token included)
    :param mask: ``[b, columns]`` over positions (boolean keep or additive), or ``None``
    """
    batch, kv_heads, group, head_dim = query.shape
    launch = launch_settings(query, mask)
    keys, values = quantized
    constants = quantized_constants(keys, values)
    constants["TILE"] = tile or constants["TILE"]
    per_split, splits = split_plan(keys.num_tokens, batch * kv_heads, constants["TILE"], target_programs)
    partials = partial_buffers(query, batch * kv_heads * (splits + 1) * launch.group_pad)
    prefix_keys, prefix_values = prefix
    ring_keys, ring_values = ring
    _static_partials_kernel[(batch * kv_heads, splits + 1)](
        query, query.stride(0), query.stride(1), query.stride(2),
        *quantized_arguments(keys, values),
        prefix_keys, prefix_values, prefix_keys.stride(0), prefix_keys.stride(1), prefix_keys.stride(2),
        ring_keys, ring_values, ring_keys.stride(0), ring_keys.stride(1), ring_keys.stride(2),
        launch.mask, *launch.mask_strides,
        quantized_tokens, ring_tokens,
        *partials,
        kv_heads, per_split, splits, scaling,
        PREFIX=prefix_keys.shape[2], PREFIX_SLOTS=max(1, prefix_keys.shape[2]), RING=ring_keys.shape[2],
        GROUP=group, GROUP_PAD=launch.group_pad, HEAD_DIM=head_dim, EXACT_TILE=exact_tile,
        MASK_KIND=launch.mask_kind, PRECISION=launch.precision, **constants, num_warps=num_warps,
    )
    output = torch.empty_like(query)
    _static_merge_kernel[(batch * kv_heads, group)](
        *partials,
        output, output.stride(0), output.stride(1), output.stride(2),
        kv_heads, splits + 1,
        GROUP_PAD=launch.group_pad, HEAD_DIM=head_dim, PARTIALS_PAD=triton.next_power_of_2(splits + 1),
        MERGE_TILE=MERGE_TILE,
    )
    return output
