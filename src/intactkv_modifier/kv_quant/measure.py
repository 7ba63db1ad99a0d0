"""How much a quantized cache changes one attention layer's output, measured on the model's own activations.

The layer is run twice on the same inputs (captured from a full-precision
forward): once reading its past K/V from a ``DynamicCache``, once from a
:class:`~intactkv_modifier.kv_quant.cache.KeyFavoredQuantizedCache`. Only the
cache differs, so the error isolates what quantizing that layer's keys and
values costs, with no drift from the layers before it. This is the measurement
behind "more bits for keys" (arXiv 2502.15075) on a given model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache

from intactkv_modifier.architecture import attention_modules
from intactkv_modifier.kv_quant.cache import KeyFavoredQuantizedCache
from intactkv_modifier.kv_quant.settings import KVQuantSettings

__all__ = ["AttentionInputs", "attention_inputs", "attention_output", "attention_output_error"]

#: What one attention layer receives: hidden states and the (cos, sin) position embeddings
AttentionInputs = tuple[torch.Tensor, tuple[torch.Tensor, ...]]


@torch.no_grad()
def attention_inputs(model: PreTrainedModel, windows: torch.Tensor) -> list[AttentionInputs]:
    """Per layer: the hidden states and position embeddings its attention receives in a full-precision forward.

    ``windows`` may live anywhere; they go to the device of the model's embeddings.
    """
    captured: dict[int, AttentionInputs] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured[module.layer_idx] = (hidden, tuple(kwargs["position_embeddings"]))

    attentions = attention_modules(model)
    handles = [attention.register_forward_pre_hook(grab, with_kwargs=True) for attention in attentions]
    try:
        model(input_ids=windows.to(model.get_input_embeddings().weight.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[attention.layer_idx] for attention in attentions]


@torch.no_grad()
def attention_output_error(
    model: PreTrainedModel,
    inputs: list[AttentionInputs],
    layer_idx: int,
    settings: KVQuantSettings,
    context: int,
    full_precision_prefix: int = 0,
) -> float:
    """Relative error ``||out_q - out|| / ||out||`` of layer ``layer_idx``'s attention output.

    The first ``context`` tokens are written to the cache; the queries of the
    remaining tokens then attend to them (read back from the cache) and to
    themselves (exact), as decoding after a prompt of ``context`` tokens would.
    ``inputs`` comes from :func:`attention_inputs`.
    """
    exact = attention_output(model, inputs, layer_idx, DynamicCache(config=model.config), context)
    quantized_cache = KeyFavoredQuantizedCache(model.config, settings, full_precision_prefix=full_precision_prefix)
    approx = attention_output(model, inputs, layer_idx, quantized_cache, context)
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


@torch.no_grad()
def attention_output(
    model: PreTrainedModel, inputs: list[AttentionInputs], layer_idx: int, cache: Cache, context: int
) -> torch.Tensor:
    """Layer ``layer_idx``'s attention run on the context (filling ``cache``), then on the rest; the rest's output.

    Only the cache (and how attention reads it) varies between calls on the same ``inputs``.
    """
    attention = attention_modules(model)[layer_idx]
    hidden, position_embeddings = inputs[layer_idx]
    window = getattr(attention, "sliding_window", None)
    length = hidden.shape[1]
    for start, stop in ((0, context), (context, length)):
        kv_length, kv_offset = cache.get_mask_sizes(stop - start, layer_idx)
        output, _ = attention(
            hidden_states=hidden[:, start:stop],
            position_embeddings=tuple(t[:, start:stop] for t in position_embeddings),
            attention_mask=_causal_mask(start, stop, kv_offset, kv_length, window, hidden),
            past_key_values=cache,
        )
    return output


def _causal_mask(
    start: int, stop: int, kv_offset: int, kv_length: int, window: int | None, like: torch.Tensor
) -> torch.Tensor:
    """Additive ``[1, 1, queries, keys]`` mask of queries ``start..stop-1`` over the keys the cache returns.

    The keys are positions ``kv_offset ..`` (a sliding-window cache returns only its window); a
    sliding-window layer also masks keys ``window`` or more positions back, as transformers does.
    """
    queries = torch.arange(start, stop, device=like.device)[:, None]
    keys = torch.arange(kv_offset, kv_offset + kv_length, device=like.device)[None, :]
    allowed = keys <= queries
    if window is not None:
        allowed &= keys > queries - window
    mask = torch.zeros(allowed.shape, dtype=like.dtype, device=like.device)
    return mask.masked_fill_(~allowed, torch.finfo(like.dtype).min)[None, None]
