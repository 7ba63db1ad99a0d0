"""Asymmetric min/max quantization of cache tensors ``[batch, heads, tokens, head_dim]`` to packed codes.

Each group stores its minimum (the zero point, an element of the group, so
exact in the model dtype) and a scale in the model dtype; codes are
``round((x - min) / scale)`` in ``0 .. 2**bits - 1``, packed along ``head_dim``.
The scale is rounded *up* to the model dtype when needed so that the top code
still reaches the group's maximum: then ``|x - dequantize(x)| <= scale / 2`` holds
for every element (up to the final rounding of the result to the model dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from intactkv_modifier.kv_quant.packing import pack, packed_length, unpack
from intactkv_modifier.kv_quant.settings import TensorQuantSettings

__all__ = ["QuantizedTensor", "dequantize", "full_precision_bytes_per_token", "quantize", "quantized_bytes_per_token"]


@dataclass(frozen=True)
class QuantizedTensor:
    """Packed codes plus per-group scale and minimum of a ``[batch, heads, tokens, head_dim]`` tensor.

    ``scale``/``minimum`` are ``[batch, heads, tokens, head_dim / group_size]`` per token
    and ``[batch, heads, tokens / group_size, head_dim]`` per channel, so both the
    codes and the statistics grow along axis 2 as tokens are appended.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    settings: TensorQuantSettings

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))

    def drop_leading(self, tokens: int) -> QuantizedTensor:
        """Without the first ``tokens`` tokens (whole groups when grouped per channel); views, no copy."""
        return self.token_slice(tokens, self.num_tokens)

    def token_slice(self, begin: int, end: int) -> QuantizedTensor:
        """Tokens ``begin .. end - 1`` (whole groups when grouped per channel); views, no copy."""
        block = self.settings.token_block
        if begin % block or end % block:
            raise ValueError(f"per_channel groups hold {block} tokens; cannot cut tokens {begin}..{end} from them")
        return QuantizedTensor(
            codes=self.codes[:, :, begin:end],
            scale=self.scale[:, :, begin // block : end // block],
            minimum=self.minimum[:, :, begin // block : end // block],
            settings=self.settings,
        )

    def select_rows(self, index: torch.Tensor) -> QuantizedTensor:
        return QuantizedTensor(
            codes=self.codes.index_select(0, index),
            scale=self.scale.index_select(0, index),
            minimum=self.minimum.index_select(0, index),
            settings=self.settings,
        )


def quantize(states: torch.Tensor, settings: TensorQuantSettings) -> QuantizedTensor:
    """Quantize ``states`` ``[batch, heads, tokens, head_dim]``; per channel, tokens must fill whole groups."""
    grouped, axis = _grouped(states, settings)
    low = grouped.amin(dim=axis, keepdim=True)
    high = grouped.amax(dim=axis, keepdim=True)
    levels = 2**settings.bits - 1
    scale = _covering_scale(low, high, levels)
    codes = ((grouped.float() - low.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    return QuantizedTensor(
        codes=pack(codes.flatten(axis - 1, axis), settings.bits),
        scale=scale.squeeze(axis),
        minimum=low.squeeze(axis),
        settings=settings,
    )


def dequantize(quantized: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``[batch, heads, tokens, head_dim]`` tensor the codes stand for, in ``dtype`` (default: the scales')."""
    settings = quantized.settings
    grouped, axis = _grouped(unpack(quantized.codes, settings.bits).float(), settings)
    # in place on the widened codes: on a CPU addcmul broadcasting along the innermost axis (per-token groups)
    # runs about three times slower than a multiply and an add in place
    values = grouped.mul_(quantized.scale.unsqueeze(axis)).add_(quantized.minimum.unsqueeze(axis))
    return values.flatten(axis - 1, axis).to(dtype or quantized.scale.dtype)


def quantized_bytes_per_token(
    settings: TensorQuantSettings, num_heads: int, head_dim: int, dtype: torch.dtype
) -> float:
    """Exact bytes one token of one row takes in the quantized region of one layer's keys or values.

    ``heads * packed(head_dim)`` code bytes, plus a scale and a minimum in ``dtype``
    for every group: ``head_dim / group_size`` per token and head when grouped per
    token; ``head_dim`` per head for every ``group_size`` tokens when grouped per
    channel (an exact per-token share, since only whole blocks are quantized).
    """
    settings.check_head_dim(head_dim, "quantized_bytes_per_token")
    itemsize = torch.empty((), dtype=dtype).element_size()
    code_bytes = num_heads * packed_length(head_dim, settings.bits)
    if settings.granularity == "per_token":
        statistics = 2 * num_heads * (head_dim // settings.group_size) * itemsize
        return float(code_bytes + statistics)
    return code_bytes + 2 * num_heads * head_dim * itemsize / settings.group_size


def full_precision_bytes_per_token(num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token of one row takes in a full-precision cache, for one layer's keys or values."""
    return num_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _grouped(tensor: torch.Tensor, settings: TensorQuantSettings) -> tuple[torch.Tensor, int]:
    """A view of ``tensor`` with one axis per group member, and that axis (reduced over to get a group's statistics)."""
    size = settings.group_size
    if settings.granularity == "per_token":
        return tensor.unflatten(-1, (-1, size)), -1
    if tensor.shape[2] % size:
        raise ValueError(
            f"per_channel quantization groups {size} consecutive tokens; got {tensor.shape[2]} tokens, "
            f"not a multiple of {size}"
        )
    return tensor.unflatten(2, (-1, size)), 3


def _covering_scale(low: torch.Tensor, high: torch.Tensor, levels: int) -> torch.Tensor:
    """``(high - low) / levels`` in the model dtype, rounded up where rounding to the dtype made it too small.

    With a scale even one ulp short, the top code would stop below ``high`` by up
    to ``levels`` ulps, more than half a step at 8 bits in bfloat16.
    """
    dtype = low.dtype
    # over a tensor, not a Python number: CUDA divides by a number as a product with its float reciprocal (a bit
    # less exact), which gave other scales on a GPU than on a CPU and than the store kernel's IEEE division
    exact = (high.float() - low.float()) / torch.full((), levels, dtype=torch.float32, device=low.device)
    scale = exact.to(dtype).clamp_min(torch.finfo(dtype).tiny)
    rounded_up = torch.nextafter(scale, torch.full_like(scale, float("inf")))
    return torch.where(scale.float() < exact, rounded_up, scale)
