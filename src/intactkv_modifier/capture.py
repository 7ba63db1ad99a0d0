"""Computing the full-precision KV of the pivot prefix.

The KV must be what the deployed model's attention would read for those
positions, so it is read from a real KV cache filled by the model's own forward
pass (post-RoPE, after any online key/value transform), with every fake-quant
switched off and every other modifier's hook silent, so GPTQ's Hessians and
AWQ's activation caches never see the prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from compressed_tensors.offload import get_execution_device
from llmcompressor.modifiers.utils.hooks import HooksMixin
from transformers import DynamicCache, PreTrainedModel

from intactkv_modifier.architecture import decoder_stack
from intactkv_modifier.kv_quant.install import kv_quantization_of
from intactkv_modifier.prefix_kv import PrefixKV

__all__ = ["capture_prefix_kv", "full_precision_forward", "mean_relative_error", "model_kv_for_prefix"]


@contextmanager
def full_precision_forward(model: torch.nn.Module) -> Iterator[None]:
    """Run forwards with weight/activation fake-quant off and modifier hooks disabled.

    Each module's own ``quantization_enabled`` flag is restored afterwards (not
    blindly re-enabled), because calibration pipelines keep quantization off
    while they propagate and must find it that way again. llm-compressor's
    ``disable_hooks`` resets the global flag to "enabled" on exit, so the flag
    is restored to what it was, which matters when this runs inside a pipeline.
    """
    saved_flags = {
        module: module.quantization_enabled
        for module in model.modules()
        if hasattr(module, "quantization_enabled")
    }
    hooks_were_disabled = HooksMixin._HOOKS_DISABLED
    for module in saved_flags:
        module.quantization_enabled = False
    try:
        with HooksMixin.disable_hooks(), torch.no_grad():
            yield
    finally:
        HooksMixin._HOOKS_DISABLED = hooks_were_disabled
        for module, flag in saved_flags.items():
            module.quantization_enabled = flag


def model_kv_for_prefix(model: PreTrainedModel, prefix_token_ids: list[int]) -> PrefixKV:
    """The KV the model computes for the prefix in its current state (quantized or not).

    It reads back a ``DynamicCache`` of its own, so an installed KV-cache
    quantization, which would swap that cache for its own, is suspended.
    """
    decoder = decoder_stack(model)
    device = get_execution_device(decoder.embed_tokens if hasattr(decoder, "embed_tokens") else model)
    input_ids = torch.tensor([prefix_token_ids], dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    kv_quantization = kv_quantization_of(model)
    with torch.no_grad(), kv_quantization.suspended() if kv_quantization is not None else nullcontext():
        decoder(input_ids=input_ids, past_key_values=cache, use_cache=True)
    keys = [layer.keys[0].detach().clone() for layer in cache.layers]
    values = [layer.values[0].detach().clone() for layer in cache.layers]
    return PrefixKV(keys=keys, values=values)


def capture_prefix_kv(model: PreTrainedModel, prefix_token_ids: list[int]) -> PrefixKV:
    """The prefix KV of the full-precision model, whatever quantization state it is in."""
    with full_precision_forward(model):
        return model_kv_for_prefix(model, prefix_token_ids)


def mean_relative_error(approx: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    """Mean over layers of ‖approx − exact‖ / ‖exact‖: how far a prefix KV is from the full-precision one."""
    errors = [
        float((a.float() - e.float()).norm() / e.float().norm().clamp_min(1e-12)) for a, e in zip(approx, exact)
    ]
    return sum(errors) / len(errors)
