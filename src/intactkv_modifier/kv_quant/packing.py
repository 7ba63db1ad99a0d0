"""Packing 2-, 3-, 4- and 8-bit integer codes densely into bytes, and back.

Codes are packed along the last axis in *units*: the fewest whole bytes that
hold a whole number of codes, ``lcm(bits, 8)`` bits. That is 4 codes per byte at
2 bits, 2 per byte at 4 bits, 1 per byte at 8 bits, and 8 codes in 3 bytes at
3 bits, so no width wastes a bit and one code path serves them all: a unit's
codes are shifted into one word (code ``i`` occupies bits ``[i * bits, (i + 1) * bits)``),
which is cut into bytes, least significant first. A one-byte unit is its own
word and stays uint8; the 3-byte unit of 3-bit codes goes through int32.
"""

from __future__ import annotations

import math
import sys
from functools import cache

import torch

__all__ = ["pack", "packed_length", "packing_unit", "unpack"]


def packing_unit(bits: int) -> tuple[int, int]:
    """``(codes, bytes)`` of one packing unit: (4, 1) at 2 bits, (8, 3) at 3, (2, 1) at 4, (1, 1) at 8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits cannot be packed into bytes; use 2, 3, 4 or 8 bits")
    unit_bits = math.lcm(bits, 8)
    return unit_bits // bits, unit_bits // 8


def packed_length(num_codes: int, bits: int) -> int:
    """Bytes that ``num_codes`` codes take once packed."""
    codes, nbytes = packing_unit(bits)
    if num_codes % codes:
        raise ValueError(f"{bits}-bit codes pack {codes} at a time; {num_codes} codes is not a multiple of {codes}")
    return num_codes // codes * nbytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (each below ``2**bits``) along the last axis into uint8 bytes."""
    per_unit, bytes_per_unit = packing_unit(bits)
    packed_length(codes.shape[-1], bits)  # validates the length
    if bits == 8:
        return codes.contiguous()
    code_shifts, byte_shifts = _shifts(bits, codes.device)
    units = codes.unflatten(-1, (-1, per_unit)).to(code_shifts.dtype)
    words = (units << code_shifts).sum(dim=-1, keepdim=True)  # disjoint bit ranges: the sum is a bitwise or
    if bytes_per_unit > 1:
        words = (words >> byte_shifts) & 0xFF
    return words.to(torch.uint8).flatten(-2)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The uint8 codes that :func:`pack` packed into ``packed``."""
    per_unit, bytes_per_unit = packing_unit(bits)
    if bits == 8:
        return packed
    if bytes_per_unit == 1 and torch.compiler.is_compiling():
        # one broadcast shift: element-wise, so the compiler fuses it into what reads the codes (a view of words
        # as bytes, _spread's, or a stack of shifted copies, would be written out in full first)
        return ((packed.unsqueeze(-1) >> _shifts(bits, packed.device)[0]) & ((1 << bits) - 1)).flatten(-2)
    if bytes_per_unit == 1 and sys.byteorder == "little":
        return _spread(packed, bits, per_unit)
    if bytes_per_unit == 1:  # one shift by a constant per code position: far faster than a broadcast shift
        mask = (1 << bits) - 1
        return torch.stack([(packed >> (bits * i)) & mask for i in range(per_unit)], dim=-1).flatten(-2)
    if packed.shape[-1] % bytes_per_unit:
        raise ValueError(f"{bits}-bit packed rows are multiples of {bytes_per_unit} bytes, got {packed.shape[-1]}")
    code_shifts, byte_shifts = _shifts(bits, packed.device)
    words = packed.unflatten(-1, (-1, bytes_per_unit))
    if bytes_per_unit > 1:
        words = (words.to(torch.int32) << byte_shifts).sum(dim=-1, keepdim=True)
    return ((words >> code_shifts) & ((1 << bits) - 1)).to(torch.uint8).flatten(-2)


def _spread(packed: torch.Tensor, bits: int, per_unit: int) -> torch.Tensor:
    """Each byte's codes moved to a byte each, in a word of ``per_unit`` bytes read back as bytes (little-endian).

    Code ``i`` goes from bit ``bits * i`` to bit ``8 * i`` in halving steps: the upper half of the
    codes moves up at once, then the upper half of each half. A few elementwise operations on whole
    words, where a stack of ``per_unit`` shifted copies writes every byte apart (two to three times
    slower on a 2048-token cache layer, one CPU thread).
    """
    words = packed.to(torch.int16 if per_unit == 2 else torch.int32)
    half = per_unit // 2
    while half:
        lanes = per_unit // half  # lanes of 8 * half bits, each keeping its lowest bits * half bits
        mask = sum(((1 << (bits * half)) - 1) << (lane * 8 * half) for lane in range(lanes))
        words = (words | (words << ((8 - bits) * half))) & mask
        half //= 2
    return words.view(torch.uint8)


@cache
def _shifts(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit offsets of the codes and of the bytes within one packing unit's word (uint8 for one-byte units)."""
    per_unit, bytes_per_unit = packing_unit(bits)
    dtype = torch.uint8 if bytes_per_unit == 1 else torch.int32
    code_shifts = torch.arange(per_unit, dtype=dtype, device=device) * bits
    byte_shifts = torch.arange(bytes_per_unit, dtype=torch.int32, device=device) * 8
    return code_shifts, byte_shifts
