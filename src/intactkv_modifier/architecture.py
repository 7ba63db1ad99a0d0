"""Where the attention layers of a transformers decoder are, and the shape of their KV.

Every decoder-only model in transformers keeps its blocks in ``<decoder>.layers``
with an attention module that knows its ``layer_idx`` and is called with a
``past_key_values`` keyword; that contract is all IntactKV relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["KVGeometry", "attention_modules", "kv_geometry", "text_config"]


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int | None


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    return config.get_text_config(decoder=True)


def kv_geometry(config: PretrainedConfig) -> KVGeometry:
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    return KVGeometry(
        num_layers=cfg.num_hidden_layers,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        max_position_embeddings=getattr(cfg, "max_position_embeddings", None),
    )


def decoder_stack(model: PreTrainedModel) -> torch.nn.Module:
    """The module whose forward receives ``input_ids`` and the cache, and owns ``layers``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not hasattr(decoder, "layers"):
        base = getattr(model, "model", None)
        if base is not None and hasattr(base, "layers"):
            return base
        raise TypeError(
            f"{type(model).__name__} has no decoder `layers` list; IntactKV supports decoder-only "
            "transformers models (Llama, Qwen2/3, Mistral, ...)."
        )
    return decoder


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """One attention module per decoder layer, in layer order."""
    modules = []
    for index, block in enumerate(decoder_stack(model).layers):
        attention = getattr(block, "self_attn", None)
        if attention is None or getattr(attention, "layer_idx", index) != index:
            raise TypeError(
                f"decoder layer {index} of {type(model).__name__} has no `self_attn` module with "
                f"layer_idx={index}; IntactKV cannot tell where its KV cache is written."
            )
        modules.append(attention)
    return modules
