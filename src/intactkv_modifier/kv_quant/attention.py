"""The packed attention path: a transformers attention function that reads the quantized cache as stored.

transformers' attention layers call ``cache.update(new K/V)`` and hand whatever
it returns to the attention function named by ``config._attn_implementation``.
:func:`packed_implementation` registers ``intactkv_packed_<base>`` (``eager`` or
``sdpa``): when the cache is in packed mode it returns the exact new K/V with its
stored past attached (:func:`attach_packed_past`: segments, nothing dequantized),
and :func:`packed_attention` attends prefix, quantized blocks, residual and new
tokens: a decode step through the Triton kernel where it runs
(:mod:`~intactkv_modifier.kv_quant.fast_decode`) or in a few large operations on a CPU
(:mod:`~intactkv_modifier.kv_quant.cpu_decode`), anything else through the torch
ops of :mod:`~intactkv_modifier.kv_quant.packed_ops`, a block of columns at a time
(:mod:`~intactkv_modifier.kv_quant.blockwise`: a chunk of queries over a long past
never holds all its scores). Any other call
(no cache, a ``DynamicCache``, the first forward of an empty cache, training)
carries no packed past and goes to ``<base>`` unchanged, so a single forward,
prefix capture and calibration are bit-for-bit what they were.

The reference path (the cache returning the dequantized past) stays, for any
other attention implementation and as what this one is tested against.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from intactkv_modifier.kv_quant.blockwise import attend_segments
from intactkv_modifier.kv_quant.cpu_decode import cpu_decode
from intactkv_modifier.kv_quant.fast_decode import kernel_decode
from intactkv_modifier.kv_quant.stream import Segment

__all__ = [
    "PackedPast",
    "PackedRows",
    "attach_packed_past",
    "attention_scaling",
    "base_attention",
    "base_implementation",
    "packed_attention",
    "packed_implementation",
    "register_over_base",
    "supports_packed_attention",
    "uses_packed_attention",
    "uses_static_attention",
]

_PREFIX = "intactkv_packed_"
#: the static cache's decode attention (:mod:`~intactkv_modifier.kv_quant.static_attention`)
STATIC_PREFIX = "intactkv_static_"
_PREFIXES = (_PREFIX, STATIC_PREFIX)
_BASES = ("eager", "sdpa")
_ATTRIBUTE = "_intactkv_packed_past"


@dataclass(frozen=True)
class PackedRows:
    """Stored keys and values of some rows of the batch (``rows=None``: all of them, in order)."""

    rows: torch.Tensor | None
    keys: Sequence[Segment]
    values: Sequence[Segment]


@dataclass(frozen=True)
class PackedPast:
    """What one layer's cache holds before the current call, for every row group."""

    groups: Sequence[PackedRows]


def attach_packed_past(new_keys: torch.Tensor, past: PackedPast) -> torch.Tensor:
    """``new_keys`` (a fresh view, the caller's tensor is untouched) carrying ``past`` to :func:`packed_attention`."""
    carrier = new_keys.view_as(new_keys)
    setattr(carrier, _ATTRIBUTE, past)
    return carrier


def supports_packed_attention(implementation: str | None) -> bool:
    """Whether the packed path can run over this attention implementation (it falls back to it when unpacked)."""
    return base_implementation(implementation or "") in _BASES


def packed_implementation(base: str) -> str:
    """The registered packed attention name over ``base`` (``eager`` or ``sdpa``), registering it on first use."""
    return register_over_base(_PREFIX, base, packed_attention)


def register_over_base(prefix: str, base: str, function: Callable[..., tuple[torch.Tensor, Any]]) -> str:
    """Register ``function`` as attention ``<prefix><base>`` (``base``: eager or sdpa) on first use; its name."""
    base = base_implementation(base)
    if not supports_packed_attention(base):
        raise ValueError(f"the KV-cache attention paths run over eager or sdpa attention, not {base!r}")
    name = prefix + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, function)
        # the base's own masks (sdpa: boolean, or none at all for a plain causal prefill, never a float
        # context x context matrix), so that the calls the base runs are exactly as without this path
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def base_implementation(name: str) -> str:
    """The eager or sdpa implementation under one of ours (``name`` itself for any other)."""
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    return name


def uses_packed_attention(config: PretrainedConfig) -> bool:
    return (getattr(config, "_attn_implementation", None) or "").startswith(_PREFIX)


def uses_static_attention(config: PretrainedConfig) -> bool:
    return (getattr(config, "_attn_implementation", None) or "").startswith(STATIC_PREFIX)


def attention_scaling(module: torch.nn.Module, kwargs: dict[str, Any]) -> float:
    """The score scale transformers passes the attention function, or ``head_dim ** -0.5`` when it passes none."""
    scaling = kwargs.get("scaling")
    return module.head_dim**-0.5 if scaling is None else scaling


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over the packed past and the exact new tokens; ``[batch, queries, heads, head_dim]`` like eager."""
    past: PackedPast | None = getattr(key, _ATTRIBUTE, None)
    if past is None:
        return base_attention(module)(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by the packed KV-cache attention")
    scaling, softcap = attention_scaling(module, kwargs), kwargs.get("softcap")
    if len(past.groups) == 1 and past.groups[0].rows is None:  # one group of all rows: no scatter, no copy
        return _attend_group(query, key, value, attention_mask, past.groups[0], scaling, softcap), None
    output = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for group in past.groups:
        output[group.rows] = _attend_group(
            _rows(query, group.rows), _rows(key, group.rows), _rows(value, group.rows),
            None if attention_mask is None else _rows(attention_mask, group.rows), group, scaling, softcap,
        )
    return output, None


def _attend_group(
    query: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    mask: torch.Tensor | None,
    group: PackedRows,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """One row group's attention output ``[b, queries, heads, head_dim]`` (a view of the result, not a copy)."""
    heads, kv_heads = query.shape[1], new_keys.shape[1]
    grouped_query = query.unflatten(1, (kv_heads, heads // kv_heads))
    attended = None
    for decode_step in (kernel_decode, cpu_decode):  # each answers None where it does not apply
        attended = decode_step(grouped_query, group.keys, group.values, new_keys, new_values, mask, scaling, softcap)
        if attended is not None:
            break
    else:
        attended = attend_segments(
            grouped_query, [*group.keys, new_keys], [*group.values, new_values], mask, scaling, softcap
        )
    return attended.flatten(1, 2).transpose(1, 2)


def _rows(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return tensor if rows is None else tensor.index_select(0, rows)


def base_attention(module: torch.nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The attention function the model would run without the packed cache (its own eager, or sdpa)."""
    base = base_implementation(module.config._attn_implementation)
    if base == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]
