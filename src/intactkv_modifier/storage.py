"""Keeping the prefix K/V on the model so that it is saved, loaded and used.

The tensors live as non-persistent buffers of each attention module: they move
with ``model.to(...)`` like any buffer, yet no ``state_dict`` (so no weight file,
compressed or not) holds them, because weight loaders such as vLLM's reject
tensors their model lacks. After every ``save_pretrained`` they are written to
the side file :data:`~intactkv_modifier.sidecar.SIDECAR_PATH` and the config
block to ``config.json`` (llm-compressor rewrites that file from the original
model's config); :func:`load_intact_kv` reads them back.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from transformers import PreTrainedModel

from intactkv_modifier.architecture import attention_modules, kv_geometry
from intactkv_modifier.capture import PrefixKV
from intactkv_modifier.config import CONFIG_KEY, KEY_BUFFER, VALUE_BUFFER, IntactKVConfig
from intactkv_modifier.kv_quant.install import install_kv_quantization
from intactkv_modifier.kv_quant.settings import KVQuantSettings
from intactkv_modifier.runtime import IntactKVRuntime
from intactkv_modifier.serving.checkpoint import read_prefix_tensors
from intactkv_modifier.sidecar import SIDECAR_PATH, write_sidecar

__all__ = ["attach_intact_kv", "config_of", "load_intact_kv", "prefix_kv_of", "write_config_block"]

_SAVES_PREFIX = "_intactkv_saves_prefix"


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
    kv_cache: KVQuantSettings | None = None,
) -> IntactKVConfig:
    """Make ``model`` use, save and describe ``prefix_kv`` as its intact prefix KV.

    With ``kv_cache`` the model also decodes with that quantized KV cache (the
    prefix kept in full precision), and the checkpoint records it so loading
    re-applies it. A quantization installed directly with
    :func:`~intactkv_modifier.kv_quant.install.install_kv_quantization` stays in
    place but is not recorded.
    """
    dtype = prefix_kv.keys[0].dtype
    config = config_for(model, prefix_token_ids, dtype).model_copy(
        update={"calibration": calibration, "kv_cache": None if kv_cache is None else kv_cache.to_config_value()}
    )
    attentions = _checked_attentions(model, config)
    _register_buffers(attentions, config, prefix_kv, lambda tensor, _: tensor.detach().to(dtype).clone())
    _install(model, config)
    return config


def load_intact_kv(model: PreTrainedModel, config: IntactKVConfig, checkpoint_dir: str | os.PathLike[str]) -> None:
    """Give a model just loaded from ``checkpoint_dir`` the prefix K/V stored there, as ``config`` declares.

    Each buffer is placed on its attention module's device and in the model's
    dtype, as ``from_pretrained`` places weights; for a checkpoint stored in the
    model's dtype the buffers are bit-exact copies of the stored tensors.
    """
    attentions = _checked_attentions(model, config)
    stored = read_prefix_tensors(checkpoint_dir, config)
    if stored.source != Path(checkpoint_dir) / SIDECAR_PATH:
        logger.warning(
            f"IntactKV: {checkpoint_dir} keeps its prefix K/V in its weight files (the layout before "
            f"{SIDECAR_PATH}); they are applied, but vLLM refuses such a checkpoint: save it again to move them."
        )
    dtype = model.dtype
    _register_buffers(
        attentions,
        config,
        PrefixKV(keys=list(stored.keys), values=list(stored.values)),
        lambda tensor, attention: tensor.to(device=_device_of(attention), dtype=dtype),
    )
    _install(model, config)


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


def _register_buffers(
    attentions: list[torch.nn.Module],
    config: IntactKVConfig,
    prefix_kv: PrefixKV,
    place: Callable[[torch.Tensor, torch.nn.Module], torch.Tensor],
) -> None:
    """Non-persistent, so no ``state_dict`` and hence no weight file ever holds them."""
    if len(prefix_kv.keys) != len(attentions) or len(prefix_kv.values) != len(attentions):
        raise ValueError(
            f"prefix KV has {len(prefix_kv.keys)} key and {len(prefix_kv.values)} value layers, "
            f"the model has {len(attentions)}"
        )
    for attention, key, value in zip(attentions, prefix_kv.keys, prefix_kv.values):
        for name, tensor in ((KEY_BUFFER, key), (VALUE_BUFFER, value)):
            if tuple(tensor.shape) != config.buffer_shape:
                raise ValueError(f"{name} of layer {attention.layer_idx} has shape {tuple(tensor.shape)}, "
                                 f"expected {config.buffer_shape}")
            attention.register_buffer(name, place(tensor, attention), persistent=False)


def _device_of(module: torch.nn.Module) -> torch.device:
    """Where the module computes: its first materialised parameter's device (the CPU for a bare module)."""
    for parameter in module.parameters():
        if not parameter.is_meta:
            return parameter.device
    return torch.device("cpu")


def _install(model: PreTrainedModel, config: IntactKVConfig) -> None:
    """The block on the model's config, the splicing hooks, the KV-cache quantization the block names,
    and the save wrapper: what every IntactKV model has."""
    setattr(model.config, CONFIG_KEY, config.to_config_value())
    IntactKVRuntime.install(model, config.prefix_token_ids)
    if config.kv_cache is not None:
        try:
            settings = KVQuantSettings.from_config_value(config.kv_cache)
        except ValueError as error:  # pydantic's ValidationError included
            raise ValueError(f"`{CONFIG_KEY}.kv_cache` does not describe a KV-cache quantization: {error}") from error
        install_kv_quantization(model, settings)
    _save_prefix_with_model(model)


def _save_prefix_with_model(model: PreTrainedModel) -> None:
    """Wrap ``save_pretrained`` (plain or llm-compressor's) so the side file and the block join the checkpoint."""
    save = model.save_pretrained
    if getattr(save, _SAVES_PREFIX, False):
        return
    model_ref = weakref.ref(model)

    @functools.wraps(save)
    def save_pretrained(save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        result = save(save_directory, *args, **kwargs)
        owner = model_ref()
        if owner is not None and kwargs.get("is_main_process", True):
            _write_prefix(owner, Path(save_directory))
        return result

    setattr(save_pretrained, _SAVES_PREFIX, True)
    model.save_pretrained = save_pretrained


def _write_prefix(model: PreTrainedModel, directory: Path) -> None:
    """The side file, then the block: llm-compressor rewrites config.json from the original model's config."""
    config = config_of(model)
    if config is None or not (directory / "config.json").exists():
        return
    prefix_kv = prefix_kv_of(model)
    write_sidecar(directory, prefix_kv.keys, prefix_kv.values, config.torch_dtype)
    write_config_block(directory, config.to_config_value())
