"""Keeping the prefix K/V on the model so that it is saved, loaded and used.

The tensors live as non-persistent buffers of each attention module: they move
with ``model.to(...)`` like any buffer, yet no ``state_dict`` (so no weight file,
compressed or not) holds them, because weight loaders such as vLLM's reject
tensors their model lacks. ``save_pretrained`` is wrapped so that every save
writes the side file and the sealed config block in the order
:mod:`intactkv_modifier.checkpoint.folder` prescribes, then the model card that
says the prefix needs this package (:mod:`intactkv_modifier.checkpoint.card`),
and uploads only then, with ``push_to_hub=True``; :func:`load_intact_kv` reads
them back.
"""

from __future__ import annotations

import copy
import functools
import os
import types
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from transformers import PreTrainedModel

from intactkv_modifier.architecture import attention_modules, kv_geometry
from intactkv_modifier.checkpoint import (
    CARD_FILE,
    NEEDS_PACKAGE,
    card_mentions_package,
    forget_prefix,
    read_prefix_tensors,
    seal_prefix,
    write_model_card,
)
from intactkv_modifier.config import CONFIG_KEY, KEY_BUFFER, VALUE_BUFFER, IntactKVConfig
from intactkv_modifier.kv_quant.install import install_kv_quantization
from intactkv_modifier.kv_quant.settings import KVQuantSettings
from intactkv_modifier.prefix_kv import PrefixKV
from intactkv_modifier.runtime import IntactKVRuntime

__all__ = ["attach_intact_kv", "config_of", "load_intact_kv", "prefix_kv_of"]

#: ``save_pretrained`` arguments that belong to the upload, which happens after the side file is written.
_UPLOAD_ARGUMENTS = ("commit_message", "commit_description", "repo_id", "create_pr", "private", "revision")
#: Set while the outermost IntactKV save runs, so that a save it calls through (llm-compressor's
#: wrapper around an earlier IntactKV one) leaves the side file to it.
_SAVING: ContextVar[bool] = ContextVar("intactkv_saving", default=False)


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
    setattr(model.config, CONFIG_KEY, config.unsealed().to_config_value())
    IntactKVRuntime.install(model, config.prefix_token_ids)
    if config.kv_cache is not None:
        try:
            settings = KVQuantSettings.from_config_value(config.kv_cache)
        except ValueError as error:  # pydantic's ValidationError included
            raise ValueError(f"`{CONFIG_KEY}.kv_cache` does not describe a KV-cache quantization: {error}") from error
        install_kv_quantization(model, settings)
    _save_prefix_with_model(model)


def _save_prefix_with_model(model: PreTrainedModel) -> None:
    """Make ``model.save_pretrained`` (plain or llm-compressor's) the outermost IntactKV save."""
    if not isinstance(vars(model).get("save_pretrained"), PrefixSavingSave):
        model.save_pretrained = PrefixSavingSave(model, model.save_pretrained)


class PrefixSavingSave:
    """``save_pretrained`` of an IntactKV model: the save it wraps, with the side file and sealed block around it.

    It passes for the bound method it replaces (``__self__``, ``__func__``),
    because llm-compressor's ``modify_save_pretrained`` re-binds the method it
    wraps, and ``copy.deepcopy`` of the model gives the copy a save of its own
    prefix, not of the original's.
    """

    def __init__(self, model: PreTrainedModel, inner: Callable[..., Any]):
        functools.update_wrapper(self, inner)
        self._model = weakref.ref(model)
        self._inner = inner

    @property
    def __self__(self) -> PreTrainedModel:
        model = self._model()
        if model is None:
            raise ReferenceError("the model this save_pretrained belonged to no longer exists")
        return model

    @property
    def __func__(self) -> Callable[..., Any]:
        inner = self._inner

        @functools.wraps(inner)
        def save_pretrained(model: PreTrainedModel, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any):
            return _save_with_prefix(model, inner, save_directory, *args, **kwargs)

        return save_pretrained

    def __call__(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        return _save_with_prefix(self.__self__, self._inner, save_directory, *args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> PrefixSavingSave:
        original = self.__self__
        duplicate = copy.deepcopy(original, memo)
        inner = self._inner
        if getattr(inner, "__self__", None) is original:  # the class's save, bound to the original: re-bind it
            inner = types.MethodType(inner.__func__, duplicate)  # type: ignore[attr-defined]
        return PrefixSavingSave(duplicate, inner)


def _save_with_prefix(
    model: PreTrainedModel, inner: Callable[..., Any], save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any
) -> Any:
    """Old side file out, weights and config.json in, then the side file and the sealed block, the card, the upload."""
    if _SAVING.get():
        return inner(save_directory, *args, **kwargs)
    push_to_hub = bool(kwargs.pop("push_to_hub", False))
    upload = {name: kwargs.pop(name) for name in _UPLOAD_ARGUMENTS if name in kwargs}
    main_process = kwargs.get("is_main_process", True)
    directory = Path(save_directory)
    saving = _SAVING.set(True)
    try:
        if main_process:
            forget_prefix(directory)
        result = inner(save_directory, *args, **kwargs)
        config = config_of(model)
        if main_process and config is not None and (directory / "config.json").exists():
            prefix_kv = prefix_kv_of(model)
            _write_card(directory, seal_prefix(directory, config, prefix_kv.keys, prefix_kv.values))
    finally:
        _SAVING.reset(saving)
    if push_to_hub and main_process:
        _upload(directory, kwargs.get("token"), upload)
    return result


def _write_card(directory: Path, config: IntactKVConfig) -> None:
    """Our card, or a word about the user's own README when it does not name the package the prefix needs."""
    if write_model_card(directory, config) == "kept" and not card_mentions_package(directory):
        logger.info(
            f"IntactKV: {directory / CARD_FILE} is yours and was left as it is, but it does not say that the prefix "
            f"needs intactkv-modifier; add: {NEEDS_PACKAGE}"
        )


def _upload(directory: Path, token: bool | str | None, upload: dict[str, Any]) -> None:
    """The whole finished folder, side file included, in one commit (transformers' own upload runs too early)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    repo_id = upload.get("repo_id") or directory.name
    repo_id = api.create_repo(repo_id, exist_ok=True, private=upload.get("private")).repo_id
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    api.create_commit(
        repo_id=repo_id,
        operations=[
            CommitOperationAdd(path_in_repo=path.relative_to(directory).as_posix(), path_or_fileobj=str(path))
            for path in files
        ],
        commit_message=upload.get("commit_message") or "Upload model",
        commit_description=upload.get("commit_description"),
        create_pr=upload.get("create_pr", False),
        revision=upload.get("revision"),
    )
