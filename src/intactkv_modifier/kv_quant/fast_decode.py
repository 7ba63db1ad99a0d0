"""When a decode step can run a Triton kernel, and its call: the layout checks between a cache and its kernel.

The kernels (:mod:`~intactkv_modifier.kv_quant.decode_kernel` over the dynamic
cache's segments, :mod:`~intactkv_modifier.kv_quant.static_decode_kernel` over the
static cache's buffers) cover the common case: one query token per row, keys per
channel and values per token (the defaults), a power-of-two head_dim up to 256,
no logit softcap, on a CUDA device with Triton installed. Anything else returns
``None`` and the caller attends through torch ops (the dynamic cache's
:mod:`~intactkv_modifier.kv_quant.packed_ops`, the static cache's own reads), which
stay the reference the kernels are tested against. ``TRITON_INTERPRET=1`` lets
the kernels run on CPU tensors (slowly), which is how they are tested without a GPU.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from intactkv_modifier.kv_quant.packing import packing_unit
from intactkv_modifier.kv_quant.settings import TensorQuantSettings
from intactkv_modifier.kv_quant.stream import QuantizedSegment, Segment, quantized_layout

if TYPE_CHECKING:
    from intactkv_modifier.kv_quant.static_cache import StaticKeyFavoredQuantizedLayer

__all__ = ["kernel_available", "kernel_decode", "static_kernel_decode", "static_kernel_store"]

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
    if query.shape[3] != 1 or not _query_supported(query[:, :, :, 0], mask, softcap):
        return None
    key_layout, value_layout = quantized_layout(keys), quantized_layout(values)
    if key_layout is None or value_layout is None or key_layout[1:] != value_layout[1:]:
        return None
    quantized_keys, exact_before, skip = key_layout
    quantized_values = value_layout[0]
    if quantized_keys is not None and not _settings_supported(
        quantized_keys.tensor.settings, quantized_values.tensor.settings
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


def static_kernel_decode(
    query: torch.Tensor,
    layer: StaticKeyFavoredQuantizedLayer,
    quantized_tokens: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    tuning: Mapping[str, int] | None = None,
) -> torch.Tensor | None:
    """Attention output ``[b, 1, heads, d]`` for ``query`` ``[b, heads, 1, d]`` over the static cache ``layer``
    after its decode step (``quantized_tokens`` of its slots attended quantized), or ``None`` where unsupported.

    ``tuning``: launch settings other than the kernel's defaults (``static_kernel_attention``'s keywords), for
    the tests and the benchmark that measures them.
    """
    batch, heads, _, head_dim = query.shape
    grouped = query[:, :, 0].unflatten(1, (layer.key_store.prefix.shape[1], -1))  # [b, kv_heads, group, d]
    if not _query_supported(grouped, mask, softcap) or not _settings_supported(
        layer.key_settings, layer.value_settings
    ):
        return None
    from intactkv_modifier.kv_quant.static_decode_kernel import static_kernel_attention  # imports triton

    keys, values = layer.key_store, layer.value_store
    output = static_kernel_attention(
        grouped,
        (keys.prefix, values.prefix),
        (keys.quantized(), values.quantized()),
        (keys.ring, values.ring),
        quantized_tokens,
        layer.length - layer.prefix_length - quantized_tokens,
        None if mask is None else mask[:, 0, 0],
        scaling,
        **(tuning or {}),
    )
    return output.reshape(batch, heads, head_dim).unsqueeze(1)


def static_kernel_store(
    layer: StaticKeyFavoredQuantizedLayer, key_states: torch.Tensor, value_states: torch.Tensor
) -> bool:
    """Store a decode step's ``[b, kv_heads, 1, d]`` states into the static cache ``layer`` through the store
    kernel; ``False``, with nothing written, where the kernel cannot write this layout.

    The kernel holds a block in power-of-two tiles: the block (a per-channel group is the whole block), a
    per-token group and the head are powers of two, and a per-token group holds whole packing units.
    """
    head_dim, device = key_states.shape[-1], key_states.device
    if not (
        key_states.shape[2] == 1
        and key_states.dtype in _DTYPES
        and kernel_available(device)
        and (device.type == "cuda" or not torch.compiler.is_compiling())  # torch.compile cannot trace the interpreter
        and _is_power_of_two(layer.block)
        and _is_power_of_two(head_dim)
        and all(_store_supported(s, layer.block) for s in (layer.key_settings, layer.value_settings))
    ):
        return False
    from intactkv_modifier.kv_quant.static_store_kernel import store_decode_step  # imports triton

    keys, values = layer.key_store, layer.value_store
    store_decode_step(
        key_states, value_states, (keys.ring, keys.codes, keys.scale, keys.minimum),
        (values.ring, values.codes, values.scale, values.minimum), layer.length,
        (layer.key_settings, layer.value_settings), layer.prefix_length, layer.residual_length, layer.block,
    )
    return True


def _store_supported(settings: TensorQuantSettings, block: int) -> bool:
    if settings.granularity == "per_channel":
        return settings.group_size == block
    return _is_power_of_two(settings.group_size) and settings.group_size % packing_unit(settings.bits)[0] == 0


def _is_power_of_two(number: int) -> bool:
    return number > 0 and not number & (number - 1)


def _query_supported(query: torch.Tensor, mask: torch.Tensor | None, softcap: float | None) -> bool:
    """Whether the kernels take ``query`` ``[b, kv_heads, group, d]`` (one token per row) under ``mask``."""
    head_dim = query.shape[-1]
    return (
        (mask is None or mask.shape[1:3] == (1, 1))
        and softcap is None
        and query.dtype in _DTYPES
        and kernel_available(query.device)
        and _is_power_of_two(head_dim)
        and 16 <= head_dim <= 256
    )


def _settings_supported(keys: TensorQuantSettings, values: TensorQuantSettings) -> bool:
    """Keys per channel in groups of a multiple of 16 tokens (the smallest tile), values per token."""
    return (
        keys.granularity == "per_channel"
        and values.granularity == "per_token"
        and math.gcd(keys.group_size, 64) >= 16
    )
