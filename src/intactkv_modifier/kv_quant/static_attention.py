"""Decode attention over the static quantized cache: its Triton kernel where it runs, else sums a compiler fuses.

A decode step of
:class:`~intactkv_modifier.kv_quant.static_cache.StaticKeyFavoredQuantizedCache`
hands attention every slot of the past position by position, each one read from
the packed codes (unpacked, scaled, offset) or from the exact ring. Given to
sdpa or to a matrix product, that past is first written out in full precision
(twice the bytes of a full-precision cache, read and written). Two ways around it:

* where the Triton kernels run (:mod:`~intactkv_modifier.kv_quant.fast_decode`'s
  conditions: a CUDA device, or ``TRITON_INTERPRET=1``), attention takes the layer
  its decode step hands over (:func:`~intactkv_modifier.kv_quant.static_cache.take_decode_step`)
  and reads prefix, codes and ring where they are stored, split across the GPU
  (:mod:`~intactkv_modifier.kv_quant.static_decode_kernel`), eagerly or compiled;
* elsewhere under ``torch.compile``, attention is written as ``sum(q * k)`` over
  the head and ``sum(p * v)`` over the tokens, so the reads become the producers of
  two reductions, which inductor fuses into them: the codes are read, not a
  dequantized copy (the CPU's compiled path).

Registered as ``intactkv_static_<base>`` (``eager`` or ``sdpa``): anything else (an
eager call without the kernel, a prefill, training, attention sinks) goes to
``<base>`` unchanged (eagerly the broadcast products would hold
``group x context x head_dim`` floats).
"""

from __future__ import annotations

from typing import Any

import torch

from intactkv_modifier.kv_quant.attention import STATIC_PREFIX, attention_scaling, base_attention, register_over_base
from intactkv_modifier.kv_quant.fast_decode import static_kernel_decode
from intactkv_modifier.kv_quant.static_cache import take_decode_step

__all__ = ["static_decode_attention", "static_implementation"]


def static_implementation(base: str) -> str:
    """The registered decode attention name over ``base`` (``eager`` or ``sdpa``): set it with
    ``model.set_attn_implementation(static_implementation("sdpa"))`` before compiling the forward."""
    return register_over_base(STATIC_PREFIX, base, static_decode_attention)


def static_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of one query token per row, ``[batch, 1, heads, head_dim]`` like eager; others go to the base."""
    step = take_decode_step(key)
    one_token = query.shape[2] == 1 and not module.training and kwargs.get("s_aux") is None
    if step is not None and one_token:
        output = static_kernel_decode(
            query, *step, attention_mask, attention_scaling(module, kwargs), kwargs.get("softcap")
        )
        if output is not None:
            return output, None
    if not (one_token and torch.compiler.is_compiling()):
        return base_attention(module)(module, query, key, value, attention_mask, **kwargs)
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, 1, head_dim).float() * attention_scaling(module, kwargs)
    scores = (grouped * key.unsqueeze(2).float()).sum(dim=-1)  # [b, kv_heads, group, tokens]
    # not cpu_decode's softmax form (scaled after the sum, masked with finfo.min): compiled by torch 2.13's inductor
    # with avx2 kernels and 2 threads, that form crashed the process (a segfault in the generated kernel)
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[2]]  # [b, 1, 1, tokens]: one mask for every head of a row
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    output = (probs.unsqueeze(-1) * value.unsqueeze(2).float()).sum(dim=-2)  # [b, kv_heads, group, head_dim]
    return output.to(query.dtype).reshape(batch, 1, heads, head_dim), None
