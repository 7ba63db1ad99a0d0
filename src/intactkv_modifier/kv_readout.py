"""Reading back the prefix K/V a model computes, and how far one prefix K/V is from another.

Free of llm-compressor: the quantizer-neutral capture (:mod:`intactkv_modifier.integrations`)
and the evaluation read the same K/V the modifier does, in environments that
have optimum, quanto or a transformers quantizer instead.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from loguru import logger
from transformers import DynamicCache, PreTrainedModel

from intactkv_modifier.architecture import decoder_stack
from intactkv_modifier.devices import execution_device
from intactkv_modifier.kv_quant.install import kv_quantization_of
from intactkv_modifier.prefix_kv import PrefixKV
from intactkv_modifier.runtime import intact_kv_disabled

__all__ = ["mean_relative_error", "model_kv_for_prefix", "replaced_error"]


def model_kv_for_prefix(model: PreTrainedModel, prefix_token_ids: list[int]) -> PrefixKV:
    """The KV the model computes for the prefix in its current state (quantized or not).

    It reads back a ``DynamicCache`` of its own, so an installed KV-cache
    quantization, which would swap that cache for its own, is suspended. The
    cache is built without the model's config: with it, a sliding-window layer
    (Gemma 3) would keep only its last ``window - 1`` positions of a longer
    prefix, where every layer must store all of them (the attention masks, not
    the cache, apply the window, so the K/V are the same).
    """
    decoder = decoder_stack(model)
    device = execution_device(decoder.embed_tokens if hasattr(decoder, "embed_tokens") else model)
    input_ids = torch.tensor([prefix_token_ids], dtype=torch.long, device=device)
    cache = DynamicCache()
    kv_quantization = kv_quantization_of(model)
    with torch.no_grad(), kv_quantization.suspended() if kv_quantization is not None else nullcontext():
        decoder(input_ids=input_ids, past_key_values=cache, use_cache=True)
    keys = [layer.keys[0].detach().clone() for layer in cache.layers]
    values = [layer.values[0].detach().clone() for layer in cache.layers]
    return PrefixKV(keys=keys, values=values)


def mean_relative_error(approx: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    """Mean over layers of ‖approx − exact‖ / ‖exact‖: how far a prefix KV is from the full-precision one."""
    errors = [
        float((a.float() - e.float()).norm() / e.float().norm().clamp_min(1e-12)) for a, e in zip(approx, exact)
    ]
    return sum(errors) / len(errors)


def replaced_error(model: PreTrainedModel, prefix_token_ids: list[int], stored: PrefixKV) -> tuple[float, float]:
    """How far the model's own prefix K/V (IntactKV off) are from ``stored``, keys and values: what IntactKV fixes.

    Logged, because a user deciding whether to ship the prefix wants to know how much it replaces.
    """
    with intact_kv_disabled(model):
        own = model_kv_for_prefix(model, prefix_token_ids)
    errors = mean_relative_error(own.keys, stored.keys), mean_relative_error(own.values, stored.values)
    logger.info(
        f"IntactKV: the quantized model's prefix KV differs from full precision by {errors[0]:.2%} (keys) and "
        f"{errors[1]:.2%} (values) on average; the stored KV replaces it"
    )
    return errors
