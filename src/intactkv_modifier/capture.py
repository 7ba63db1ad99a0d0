"""Computing the full-precision KV of the pivot prefix inside llm-compressor.

The KV must be what the deployed model's attention would read for those
positions, so it is read from a real KV cache filled by the model's own forward
pass (post-RoPE, after any online key/value transform;
:func:`~intactkv_modifier.kv_readout.model_kv_for_prefix`), with every
fake-quant switched off and every other modifier's hook silent, so GPTQ's
Hessians and AWQ's activation caches never see the prefix. Quantizers outside
llm-compressor need none of this: :mod:`intactkv_modifier.integrations`
captures before they run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from llmcompressor.modifiers.utils.hooks import HooksMixin
from transformers import PreTrainedModel

from intactkv_modifier.kv_readout import model_kv_for_prefix
from intactkv_modifier.prefix_kv import PrefixKV

__all__ = ["capture_prefix_kv", "full_precision_forward"]


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


def capture_prefix_kv(model: PreTrainedModel, prefix_token_ids: list[int]) -> PrefixKV:
    """The prefix KV of the full-precision model, whatever llm-compressor quantization state it is in."""
    with full_precision_forward(model):
        return model_kv_for_prefix(model, prefix_token_ids)
