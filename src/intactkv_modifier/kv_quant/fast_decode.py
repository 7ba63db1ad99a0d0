"""When a decode step can run the Triton kernel, and its call: the layout checks between the cache and the kernel.

The kernel (:mod:`~intactkv_modifier.kv_quant.decode_kernel`) covers the common
case: one query token per row, keys per channel and values per token (the
defaults), a power-of-two head_dim up to 256, no logit softcap, on a CUDA device
with Triton installed. Anything else returns ``None`` and the caller attends
through the torch ops of :mod:`~intactkv_modifier.kv_quant.packed_ops`, which
stay the reference the kernel is tested against. ``TRITON_INTERPRET=1`` lets the
kernel run on CPU tensors (slowly), which is how it is tested without a GPU.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence

import torch

from intactkv_modifier.kv_quant.stream import QuantizedSegment, Segment, quantized_layout

__all__ = ["kernel_decode", "kernel_available"]

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_available(device: torch.device) -> bool:
    """Whether the decode kernel can run on tensors of ``device`` here."""
    if not _TRITON_INSTALLED:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def kernel_decode(
    query: torch.Tensor,
    keys: Sequence[Segment],
    values: Sequence[Segment],
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor | None:
    """Attention output for ``query`` ``[b, kv_heads, group, 1, d]`` (the same shape), or ``None`` where unsupported.

    ``keys``/``values`` are one row group's stored segments in slot order, ``new_*``
    the exact states of the current token, ``mask`` ``[b, 1, 1, columns]`` over all of them.
    """
    head_dim = query.shape[-1]
    if (
        query.shape[3] != 1
        or (mask is not None and mask.shape[1:3] != (1, 1))
        or softcap is not None
        or query.dtype not in _DTYPES
        or not kernel_available(query.device)
        or head_dim & (head_dim - 1)
        or not 16 <= head_dim <= 256
    ):
        return None
    key_layout, value_layout = quantized_layout(keys), quantized_layout(values)
    if key_layout is None or value_layout is None or key_layout[1:] != value_layout[1:]:
        return None
    quantized_keys, exact_before, skip = key_layout
    quantized_values = value_layout[0]
    if quantized_keys is not None:
        key_settings, value_settings = quantized_keys.tensor.settings, quantized_values.tensor.settings
        if (
            key_settings.granularity != "per_channel"
            or value_settings.granularity != "per_token"
            or math.gcd(key_settings.group_size, 64) < 16
        ):
            return None
    from intactkv_modifier.kv_quant.decode_kernel import decode_attention  # imports triton: only when it runs

    exact_keys = torch.cat([*(s for s in keys if not isinstance(s, QuantizedSegment)), new_keys], dim=2)
    exact_values = torch.cat([*(s for s in values if not isinstance(s, QuantizedSegment)), new_values], dim=2)
    return decode_attention(
        query[:, :, :, 0],
        None if quantized_keys is None else quantized_keys.tensor,
        None if quantized_values is None else quantized_values.tensor,
        skip,
        exact_keys,
        exact_values,
        exact_before,
        None if mask is None else mask[:, 0, 0],
        scaling,
    ).unsqueeze(3)
