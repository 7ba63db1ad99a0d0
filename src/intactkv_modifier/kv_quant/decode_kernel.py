"""Triton kernels for one decode step over a packed cache: the codes are read once, nothing is dequantized to memory.

One query token per row (the GQA group of a KV head is one tile of queries).
The quantized tokens are split across programs (flash-decoding): each program
walks its share in tiles, widens the 2/3/4/8-bit codes of keys (per-channel
scales, one row per ``group_size`` tokens) and values (per-token scales) in
registers, and keeps a running softmax; a second kernel attends the few
full-precision tokens (intact prefix, residual window, the new token) and merges
every partial result. Memory read per step is therefore the packed bytes plus the
scales, which is what makes a quantized cache faster than a full-precision one
at long contexts instead of slower.

The tiles, the running softmax and the partial results' store are ``triton.jit``
building blocks that the static cache's kernels (:mod:`~intactkv_modifier.kv_quant.static_decode_kernel`)
share, with the launch helpers.

Only imported when Triton is installed (``triton`` ships with CUDA builds of
torch); ``TRITON_INTERPRET=1`` runs the same kernels on the CPU for tests.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from intactkv_modifier.kv_quant.quantizer import QuantizedTensor

__all__ = [
    "LaunchSettings",
    "attend_tile",
    "decode_attention",
    "launch_settings",
    "load_query",
    "partial_buffers",
    "quantized_arguments",
    "quantized_constants",
    "quantized_tiles",
    "split_plan",
    "store_partials",
]

#: Programs to aim for, so that a small batch still fills the GPU (an H100 has 132 SMs)
TARGET_PROGRAMS = 264
#: Masked scores: finite, so that a fully masked tile cannot turn the running maximum into NaN
MASKED = tl.constexpr(-1.0e30)


@triton.jit
def _widen(codes_ptr, row_offsets, channels, valid, HEAD_DIM: tl.constexpr, BITS: tl.constexpr):
    """Codes ``[tokens, channels]`` of a packed row: code ``c`` starts at bit ``c * BITS`` (see ``packing``).

    Where whole codes fill a byte (2, 4, 8 bits) the row's bytes are loaded once, side by side, and split in
    registers: on an H200 that took the static kernel from 40.0 to 27.1 µs a layer at 16K tokens (K4V2), against
    a load of the byte under every code (``benchmarks/results/gpu/contiguous-code-loads/``).
    """
    if (8 % BITS) == 0:
        PER_BYTE: tl.constexpr = 8 // BITS
        packed = tl.load(codes_ptr + row_offsets[:, None] + tl.arange(0, HEAD_DIM // PER_BYTE)[None, :],
                         mask=valid[:, None], other=0).to(tl.int32)
        if PER_BYTE == 1:
            return packed
        shifts = tl.arange(0, PER_BYTE) * BITS
        codes = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # [tokens, bytes, PER_BYTE]
        return tl.reshape(codes, (packed.shape[0], HEAD_DIM))
    # a 3-bit code may straddle two bytes: the byte under each code, and the next one where it spills
    bit = channels * BITS
    pointers = codes_ptr + row_offsets[:, None] + (bit >> 3)[None, :]
    word = tl.load(pointers, mask=valid[:, None], other=0).to(tl.int32)
    spills = ((bit & 7) + BITS > 8)[None, :]
    word |= tl.load(pointers + 1, mask=valid[:, None] & spills, other=0).to(tl.int32) << 8
    return (word >> (bit & 7)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _mask_scores(scores, mask_ptr, mask_stride, columns, valid, MASK_KIND: tl.constexpr):
    """Apply the attention mask of these columns (0: none, 1: boolean keep, 2: additive) and drop invalid ones."""
    if MASK_KIND == 1:
        keep = tl.load(mask_ptr + columns * mask_stride, mask=valid, other=0) != 0
        valid = valid & keep
    if MASK_KIND == 2:
        scores += tl.load(mask_ptr + columns * mask_stride, mask=valid, other=0.0).to(tl.float32)[None, :]
    return tl.where(valid[None, :], scores, MASKED), valid


@triton.jit
def load_query(query_ptr, row, head, q_row, q_head, q_group,
               GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The GQA group's queries ``[GROUP_PAD, HEAD_DIM]``, zero rows past ``GROUP`` (a dot needs 16 rows)."""
    queries = tl.arange(0, GROUP_PAD)
    return tl.load(
        query_ptr + row * q_row + head * q_head + queries[:, None] * q_group + tl.arange(0, HEAD_DIM)[None, :],
        mask=(queries < GROUP)[:, None], other=0.0,
    )


@triton.jit
def attend_tile(query, keys, values, valid, mask_ptr, mask_column, columns, scaling,
                running_max, running_sum, accumulated, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr):
    """One tile of tokens into the running softmax: the updated ``(maximum, sum, weighted values)``."""
    # float32 whatever ``scaling`` arrives as (inductor passes a Python float in as a float64 constant)
    scores = (tl.dot(query, tl.trans(keys), input_precision=PRECISION) * scaling).to(tl.float32)
    scores, valid = _mask_scores(scores, mask_ptr, mask_column, columns, valid, MASK_KIND)
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    probs = tl.where(valid[None, :], tl.exp(scores - new_max[:, None]), 0.0)
    rescale = tl.exp(running_max - new_max)
    running_sum = running_sum * rescale + tl.sum(probs, axis=1)
    weighted = tl.dot(probs.to(query.dtype), values, input_precision=PRECISION)
    return new_max, running_sum, accumulated * rescale[:, None] + weighted


#: Arguments that change from step to step (lengths, and strides of buffers that grow): Triton would otherwise
#: compile a variant for each divisibility it sees, in the middle of decoding
_PARTIALS_DYNAMIC = [
    "q_row", "q_head", "kc_row", "kc_head", "ks_row", "ks_head", "vc_row", "vc_head", "vs_row", "vs_head",
    "mask_row", "mask_column", "first_column", "tokens", "skip", "tokens_per_split", "splits",
]
_MERGE_DYNAMIC = [
    "q_row", "q_head", "fp_row", "fp_head", "mask_row", "mask_column", "exact_before", "quantized_columns",
    "o_row", "o_head", "exact_tokens", "splits",
]


@triton.jit
def quantized_tiles(
    query, row, head, begin, end, skip, first_column,
    key_codes_ptr, kc_row, kc_head, kc_token,
    key_scale_ptr, key_min_ptr, ks_row, ks_head, ks_block,
    value_codes_ptr, vc_row, vc_head, vc_token,
    value_scale_ptr, value_min_ptr, vs_row, vs_head, vs_token,
    mask_ptr, mask_column, scaling,
    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr,
    KEY_BITS: tl.constexpr, KEY_GROUP: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_GROUP: tl.constexpr,
    MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
):
    """Quantized tokens ``begin .. end - 1`` (before ``skip``: not attended) of one row and KV head, as a running
    softmax ``(maximum, sum, weighted values)``; token ``t`` is mask column ``first_column + t - skip``.

    A tile within one key group (``TILE`` divides ``KEY_GROUP``; tiles start at multiples of ``TILE``) reads that
    group's scales once; a longer tile spans several groups and each token reads its group's (more bytes in
    flight per step of the loop, whose steps each wait out the memory's latency).
    """
    channels = tl.arange(0, HEAD_DIM)
    VALUE_GROUPS: tl.constexpr = HEAD_DIM // VALUE_GROUP
    value_groups = tl.arange(0, VALUE_GROUPS)
    running_max = tl.full([GROUP_PAD], MASKED, tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    accumulated = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for tile_start in range(begin, end, TILE):
        token = tile_start + tl.arange(0, TILE)
        valid = (token >= skip) & (token < end)
        codes = _widen(key_codes_ptr + row * kc_row + head * kc_head, token * kc_token, channels, valid,
                       HEAD_DIM, KEY_BITS)
        if KEY_GROUP % TILE == 0:
            statistics = row * ks_row + head * ks_head + (tile_start // KEY_GROUP) * ks_block + channels
            scale = tl.load(key_scale_ptr + statistics).to(tl.float32)[None, :]
            minimum = tl.load(key_min_ptr + statistics).to(tl.float32)[None, :]
        else:
            statistics = row * ks_row + head * ks_head + (token // KEY_GROUP)[:, None] * ks_block + channels[None, :]
            scale = tl.load(key_scale_ptr + statistics, mask=valid[:, None], other=0.0).to(tl.float32)
            minimum = tl.load(key_min_ptr + statistics, mask=valid[:, None], other=0.0).to(tl.float32)
        keys = (codes.to(tl.float32) * scale + minimum).to(query.dtype)
        codes = _widen(value_codes_ptr + row * vc_row + head * vc_head, token * vc_token, channels, valid, HEAD_DIM,
                       VALUE_BITS)
        # a value group's scale and minimum loaded once per token (not once per channel), spread over its channels
        statistics = row * vs_row + head * vs_head + token[:, None] * vs_token + value_groups[None, :]
        scale = tl.load(value_scale_ptr + statistics, mask=valid[:, None], other=0.0).to(tl.float32)
        minimum = tl.load(value_min_ptr + statistics, mask=valid[:, None], other=0.0).to(tl.float32)
        grouped = tl.reshape(codes, (TILE, VALUE_GROUPS, VALUE_GROUP)).to(tl.float32)
        values = tl.reshape(grouped * scale[:, :, None] + minimum[:, :, None], (TILE, HEAD_DIM)).to(query.dtype)
        running_max, running_sum, accumulated = attend_tile(
            query, keys, values, valid, mask_ptr, mask_column, first_column + token - skip, scaling,
            running_max, running_sum, accumulated, MASK_KIND, PRECISION,
        )
    return running_max, running_sum, accumulated


@triton.jit
def store_partials(partial_out_ptr, partial_max_ptr, partial_sum_ptr, slot, running_max, running_sum, accumulated,
                   GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    """A partial result at ``slot`` (``GROUP_PAD`` rows of queries apart): its first ``ROWS`` rows, the ones a
    merge reads (the padding rows of the dot hold no query)."""
    queries = tl.arange(0, GROUP_PAD)
    channels = tl.arange(0, HEAD_DIM)
    stored = queries < ROWS
    tl.store(partial_out_ptr + (slot * GROUP_PAD + queries[:, None]) * HEAD_DIM + channels[None, :], accumulated,
             mask=stored[:, None])
    tl.store(partial_max_ptr + slot * GROUP_PAD + queries, running_max, mask=stored)
    tl.store(partial_sum_ptr + slot * GROUP_PAD + queries, running_sum, mask=stored)


@triton.jit
def merge_partials(partial_out_ptr, partial_max_ptr, partial_sum_ptr, program, splits,
                   running_max, running_sum, accumulated,
                   GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Fold the ``splits`` partial results of ``program``, one at a time, into a running softmax; the normalized
    output. (The static kernels merge in parallel: ``static_decode_kernel._static_merge_kernel``.)"""
    queries = tl.arange(0, GROUP_PAD)
    channels = tl.arange(0, HEAD_DIM)
    for split in range(0, splits):
        slot = program * splits + split
        partial_max = tl.load(partial_max_ptr + slot * GROUP_PAD + queries)
        new_max = tl.maximum(running_max, partial_max)
        mine, theirs = tl.exp(running_max - new_max), tl.exp(partial_max - new_max)
        partial = tl.load(partial_out_ptr + (slot * GROUP_PAD + queries[:, None]) * HEAD_DIM + channels[None, :])
        accumulated = accumulated * mine[:, None] + partial * theirs[:, None]
        running_sum = running_sum * mine + tl.load(partial_sum_ptr + slot * GROUP_PAD + queries) * theirs
        running_max = new_max
    return accumulated / running_sum[:, None]


@triton.jit
def store_output(out_ptr, row, head, o_row, o_head, o_group, output,
                 GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    queries = tl.arange(0, GROUP_PAD)
    channels = tl.arange(0, HEAD_DIM)
    tl.store(
        out_ptr + row * o_row + head * o_head + queries[:, None] * o_group + channels[None, :],
        output, mask=(queries < GROUP)[:, None],
    )


@triton.jit(do_not_specialize=_PARTIALS_DYNAMIC)
def _quantized_partials_kernel(
    query_ptr, q_row, q_head, q_group,
    key_codes_ptr, kc_row, kc_head, kc_token,
    key_scale_ptr, key_min_ptr, ks_row, ks_head, ks_block,
    value_codes_ptr, vc_row, vc_head, vc_token,
    value_scale_ptr, value_min_ptr, vs_row, vs_head, vs_token,
    mask_ptr, mask_row, mask_column, first_column,
    partial_out_ptr, partial_max_ptr, partial_sum_ptr,
    kv_heads, tokens, skip, tokens_per_split, splits, scaling,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr,
    KEY_BITS: tl.constexpr, KEY_GROUP: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_GROUP: tl.constexpr,
    MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
):
    program, split = tl.program_id(0), tl.program_id(1)
    row, head = program // kv_heads, program % kv_heads
    query = load_query(query_ptr, row, head, q_row, q_head, q_group, GROUP, GROUP_PAD, HEAD_DIM)
    begin = split * tokens_per_split
    running_max, running_sum, accumulated = quantized_tiles(
        query, row, head, begin, tl.minimum(begin + tokens_per_split, tokens), skip, first_column,
        key_codes_ptr, kc_row, kc_head, kc_token, key_scale_ptr, key_min_ptr, ks_row, ks_head, ks_block,
        value_codes_ptr, vc_row, vc_head, vc_token, value_scale_ptr, value_min_ptr, vs_row, vs_head, vs_token,
        mask_ptr + row * mask_row, mask_column, scaling,
        GROUP_PAD, HEAD_DIM, TILE, KEY_BITS, KEY_GROUP, VALUE_BITS, VALUE_GROUP, MASK_KIND, PRECISION,
    )
    store_partials(partial_out_ptr, partial_max_ptr, partial_sum_ptr, program * splits + split,
                   running_max, running_sum, accumulated, GROUP_PAD, HEAD_DIM, GROUP_PAD)


@triton.jit(do_not_specialize=_MERGE_DYNAMIC)
def _exact_and_merge_kernel(
    query_ptr, q_row, q_head, q_group,
    keys_ptr, values_ptr, fp_row, fp_head, fp_token,
    mask_ptr, mask_row, mask_column, exact_before, quantized_columns,
    partial_out_ptr, partial_max_ptr, partial_sum_ptr,
    out_ptr, o_row, o_head, o_group,
    kv_heads, exact_tokens, splits, scaling,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr,
    MASK_KIND: tl.constexpr, PRECISION: tl.constexpr,
):
    program = tl.program_id(0)
    row, head = program // kv_heads, program % kv_heads
    channels = tl.arange(0, HEAD_DIM)
    query = load_query(query_ptr, row, head, q_row, q_head, q_group, GROUP, GROUP_PAD, HEAD_DIM)
    running_max = tl.full([GROUP_PAD], MASKED, tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    accumulated = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for tile_start in range(0, exact_tokens, TILE):
        token = tile_start + tl.arange(0, TILE)
        valid = token < exact_tokens
        offsets = row * fp_row + head * fp_head + token[:, None] * fp_token + channels[None, :]
        keys = tl.load(keys_ptr + offsets, mask=valid[:, None], other=0.0)
        values = tl.load(values_ptr + offsets, mask=valid[:, None], other=0.0)
        running_max, running_sum, accumulated = attend_tile(
            query, keys, values, valid, mask_ptr + row * mask_row, mask_column,
            tl.where(token < exact_before, token, token + quantized_columns), scaling,
            running_max, running_sum, accumulated, MASK_KIND, PRECISION,
        )
    output = merge_partials(partial_out_ptr, partial_max_ptr, partial_sum_ptr, program, splits,
                            running_max, running_sum, accumulated, GROUP_PAD, HEAD_DIM)
    store_output(out_ptr, row, head, o_row, o_head, o_group, output.to(query.dtype), GROUP, GROUP_PAD, HEAD_DIM)


class LaunchSettings(NamedTuple):
    """What every launch of one step shares: the padded GQA group, the dot precision and the mask's form.

    A named tuple of plain values: built inside a step that ``torch.compile`` traces (the static cache's).
    """

    group_pad: int
    precision: str
    mask_kind: int  # 0: none, 1: boolean keep, 2: additive
    mask: torch.Tensor  # the query stands in when there is no mask (never read then)
    mask_strides: tuple[int, int]


def launch_settings(query: torch.Tensor, mask: torch.Tensor | None) -> LaunchSettings:
    """For ``query`` ``[b, kv_heads, group, d]`` and ``mask`` ``[b, columns]`` (or ``None``)."""
    return LaunchSettings(
        group_pad=max(16, 1 << (query.shape[2] - 1).bit_length()),  # a dot needs 16 rows
        precision="ieee" if query.dtype == torch.float32 else "tf32",
        mask_kind=0 if mask is None else (1 if mask.dtype == torch.bool else 2),
        mask=query if mask is None else mask,
        mask_strides=(0, 0) if mask is None else (mask.stride(0), mask.stride(1)),
    )


def split_plan(tokens: int, programs: int, tile: int, target_programs: int = TARGET_PROGRAMS) -> tuple[int, int]:
    """``(tokens per split, splits)``: enough splits of whole tiles that ``programs`` (rows x KV heads) make about
    ``target_programs``, so that a small batch still fills the GPU."""
    per_split = max(tile, -(-tokens // max(1, target_programs // programs)))
    per_split = -(-per_split // tile) * tile
    return per_split, -(-tokens // per_split)


def partial_buffers(query: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted values, maxima and sums of ``slots`` partial results (one allocation for the three)."""
    head_dim = query.shape[-1]
    scratch = query.new_empty(slots * (head_dim + 2), dtype=torch.float32)
    partial_out, partial_max, partial_sum = scratch.split([slots * head_dim, slots, slots])
    return partial_out, partial_max, partial_sum


def quantized_arguments(keys: QuantizedTensor, values: QuantizedTensor) -> tuple[object, ...]:
    """The partials kernels' codes, statistics and strides, in their argument order."""
    kc, ks, vc, vs = keys.codes, keys.scale, values.codes, values.scale
    return (
        kc, kc.stride(0), kc.stride(1), kc.stride(2),
        ks, keys.minimum, ks.stride(0), ks.stride(1), ks.stride(2),
        vc, vc.stride(0), vc.stride(1), vc.stride(2),
        vs, values.minimum, vs.stride(0), vs.stride(1), vs.stride(2),
    )


def quantized_constants(keys: QuantizedTensor, values: QuantizedTensor) -> dict[str, int]:
    """The partials kernels' bit widths, groups and tile."""
    return dict(
        TILE=math.gcd(keys.settings.group_size, 64), KEY_BITS=keys.settings.bits, KEY_GROUP=keys.settings.group_size,
        VALUE_BITS=values.settings.bits, VALUE_GROUP=values.settings.group_size,
    )


def decode_attention(
    query: torch.Tensor,
    quantized_keys: QuantizedTensor | None,
    quantized_values: QuantizedTensor | None,
    skip: int,
    exact_keys: torch.Tensor,
    exact_values: torch.Tensor,
    exact_before: int,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Attention of one query token per row over a packed past; ``[b, kv_heads, group, d]`` -> the same shape.

    :param quantized_keys: per-channel keys (``None``: nothing quantized yet), with
        ``quantized_values`` the per-token values of the same tokens
    :param skip: leading quantized tokens not to attend (older tokens of the first group)
    :param exact_keys: the full-precision tokens ``[b, kv_heads, tokens, d]``: the first
        ``exact_before`` come before the quantized ones in slot order, the rest after
    :param mask: ``[b, columns]`` over the attended slots in order (boolean keep or
        additive), or ``None``
    """
    batch, kv_heads, group, head_dim = query.shape
    launch = launch_settings(query, mask)
    common = dict(GROUP=group, GROUP_PAD=launch.group_pad, HEAD_DIM=head_dim, MASK_KIND=launch.mask_kind,
                  PRECISION=launch.precision)
    quantized_columns = splits = 0
    partials = (query, query, query)  # unread when nothing is quantized
    if quantized_keys is not None and quantized_values is not None:
        tokens = quantized_keys.num_tokens
        quantized_columns = tokens - skip
        constants = quantized_constants(quantized_keys, quantized_values)
        per_split, splits = split_plan(tokens, batch * kv_heads, constants["TILE"])
        partials = partial_buffers(query, batch * kv_heads * splits * launch.group_pad)
        _quantized_partials_kernel[(batch * kv_heads, splits)](
            query, query.stride(0), query.stride(1), query.stride(2),
            *quantized_arguments(quantized_keys, quantized_values),
            launch.mask, *launch.mask_strides, exact_before,
            *partials,
            kv_heads, tokens, skip, per_split, splits, scaling,
            **common, **constants,
        )
    output = torch.empty_like(query)
    _exact_and_merge_kernel[(batch * kv_heads,)](
        query, query.stride(0), query.stride(1), query.stride(2),
        exact_keys, exact_values, exact_keys.stride(0), exact_keys.stride(1), exact_keys.stride(2),
        launch.mask, *launch.mask_strides, exact_before, quantized_columns,
        *partials,
        output, output.stride(0), output.stride(1), output.stride(2),
        kv_heads, exact_keys.shape[2], splits, scaling,
        TILE=16, **common,
    )
    return output
