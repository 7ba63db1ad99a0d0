"""Keeping the prefix K/V on the model so that it is saved, loaded and used.

The tensors live as persistent buffers of each attention module, so any
``save_pretrained`` (compressed or not) writes them to the checkpoint's
safetensors and ``from_pretrained`` fills them back; the config block lives on
``model.config`` and is written to ``config.json`` after every save, because
llm-compressor rewrites that file from the original model's config.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from intactkv_modifier.architecture import attention_modules, kv_geometry
from intactkv_modifier.capture import PrefixKV
from intactkv_modifier.config import CONFIG_KEY, KEY_BUFFER, VALUE_BUFFER, IntactKVConfig
from intactkv_modifier.runtime import IntactKVRuntime

__all__ = ["attach_intact_kv", "config_of", "prepare_for_loading", "prefix_kv_of", "write_config_block"]


def config_for(model: PreTrainedModel, prefix_token_ids: list[int], dtype: torch.dtype) -> IntactKVConfig:
    geometry = kv_geometry(model.config)
    return IntactKVConfig(
        prefix_token_ids=prefix_token_ids,
        num_layers=geometry.num_layers,
        num_key_value_heads=geometry.num_key_value_heads,
        head_dim=geometry.head_dim,
        dtype=IntactKVConfig.dtype_name(dtype),
    )


def attach_intact_kv(
    model: PreTrainedModel,
    prefix_token_ids: list[int],
    prefix_kv: PrefixKV,
    calibration: dict[str, Any] | None = None,
) -> IntactKVConfig:
    """Make ``model`` use, save and describe ``prefix_kv`` as its intact prefix KV."""
    dtype = prefix_kv.keys[0].dtype
    config = config_for(model, prefix_token_ids, dtype).model_copy(update={"calibration": calibration})
    attentions = _checked_attentions(model, config)
    if len(prefix_kv.keys) != len(attentions):
        raise ValueError(f"prefix KV has {len(prefix_kv.keys)} layers, the model has {len(attentions)}")
    for attention, key, value in zip(attentions, prefix_kv.keys, prefix_kv.values):
        for name, tensor in ((KEY_BUFFER, key), (VALUE_BUFFER, value)):
            if tuple(tensor.shape) != config.buffer_shape:
                raise ValueError(f"{name} of layer {attention.layer_idx} has shape {tuple(tensor.shape)}, "
                                 f"expected {config.buffer_shape}")
            attention.register_buffer(name, tensor.detach().to(dtype).clone(), persistent=True)
    setattr(model.config, CONFIG_KEY, config.to_config_value())
    IntactKVRuntime.install(model, prefix_token_ids)
    _write_config_after_save(model)
    return config


def prepare_for_loading(model: PreTrainedModel, config: IntactKVConfig) -> None:
    """Give a freshly built model empty prefix buffers that ``from_pretrained`` will fill.

    The buffers start as NaN so that a checkpoint lacking them fails loudly at the
    first forward instead of attending to uninitialised memory.
    """
    for attention in _checked_attentions(model, config):
        for name in (KEY_BUFFER, VALUE_BUFFER):
            existing = getattr(attention, name, None)
            if existing is not None and tuple(existing.shape) == config.buffer_shape:
                continue
            attention.register_buffer(
                name, torch.full(config.buffer_shape, float("nan"), dtype=config.torch_dtype), persistent=True
            )
    IntactKVRuntime.install(model, config.prefix_token_ids)
    _write_config_after_save(model)


def config_of(model: PreTrainedModel) -> IntactKVConfig | None:
    value = getattr(model.config, CONFIG_KEY, None)
    return None if value is None else IntactKVConfig.from_config_value(value)


def prefix_kv_of(model: PreTrainedModel) -> PrefixKV:
    attentions = attention_modules(model)
    missing = [a.layer_idx for a in attentions if not hasattr(a, KEY_BUFFER)]
    if missing:
        raise ValueError(f"the model carries no IntactKV tensors (layers {missing} lack `{KEY_BUFFER}`)")
    return PrefixKV(
        keys=[getattr(a, KEY_BUFFER) for a in attentions],
        values=[getattr(a, VALUE_BUFFER) for a in attentions],
    )


def write_config_block(save_directory: str | os.PathLike[str], block: dict[str, Any]) -> None:
    """Add the block to ``config.json`` atomically: a crash leaves the old file, never half a file."""
    path = Path(save_directory) / "config.json"
    config = json.loads(path.read_text())
    config[CONFIG_KEY] = block
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(handle.name, path)


def _checked_attentions(model: PreTrainedModel, config: IntactKVConfig) -> list[torch.nn.Module]:
    geometry = kv_geometry(model.config)
    expected = (geometry.num_layers, geometry.num_key_value_heads, geometry.head_dim)
    declared = (config.num_layers, config.num_key_value_heads, config.head_dim)
    if declared != expected:
        raise ValueError(
            f"IntactKV prefix KV is for (layers, kv heads, head dim) = {declared}, but "
            f"{type(model).__name__} has {expected}; the checkpoint's prefix KV does not belong to this model."
        )
    if geometry.max_position_embeddings is not None and config.prefix_length >= geometry.max_position_embeddings:
        raise ValueError(
            f"IntactKV prefix of {config.prefix_length} tokens does not fit the model's context of "
            f"{geometry.max_position_embeddings} positions."
        )
    return attention_modules(model)


def _write_config_after_save(model: PreTrainedModel) -> None:
    """Wrap ``save_pretrained`` (plain or llm-compressor's) so the block lands in config.json."""
    save = model.save_pretrained
    if getattr(save, "_intactkv_writes_config", False):
        return
    model_ref = weakref.ref(model)

    @functools.wraps(save)
    def save_pretrained(save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        result = save(save_directory, *args, **kwargs)
        owner = model_ref()
        block = getattr(owner.config, CONFIG_KEY, None) if owner is not None else None
        if block is not None and (Path(save_directory) / "config.json").exists():
            write_config_block(save_directory, IntactKVConfig.from_config_value(block).to_config_value())
        return result

    save_pretrained._intactkv_writes_config = True  # type: ignore[attr-defined]
    model.save_pretrained = save_pretrained
