"""Applying a checkpoint's intact prefix KV when transformers loads the model.

Importing :mod:`intactkv_modifier` wraps ``PreTrainedModel.from_pretrained``.
When the loaded model's config carries the IntactKV block, the wrapper reads the
prefix K/V from the checkpoint's side file (or, for checkpoints written before
it existed, from the weight files) and gives the model its buffers and splicing
hooks; every other model is returned untouched.

Why after loading and not while building the model: transformers 5 builds models
on the meta device and fills only what the weight files hold. The prefix buffers
are non-persistent (so that no weight file holds them and vLLM can load the
weights), so transformers would leave them uninitialised; the finished model,
on its final devices, is the first point where they can be filled for real.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from intactkv_modifier.architecture import attention_modules
from intactkv_modifier.checkpoint import HubAccess, checkpoint_folder
from intactkv_modifier.config import CONFIG_KEY
from intactkv_modifier.storage import config_of, load_intact_kv

__all__ = ["install_loading_hook"]

_MARK = "_intactkv_loading_hook"
#: ``from_pretrained`` arguments that say where a hub checkpoint's files come from.
_HUB_ARGUMENTS = tuple(HubAccess.model_fields)


def install_loading_hook() -> None:
    """Idempotent: importing the package twice, or reloading it, wraps only once."""
    original = PreTrainedModel.from_pretrained.__func__  # type: ignore[attr-defined]
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def from_pretrained(
        cls: type[PreTrainedModel],
        pretrained_model_name_or_path: str | os.PathLike[str] | None,
        *model_args: Any,
        **kwargs: Any,
    ) -> Any:
        loaded = original(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True adds a dict
        config = config_of(model)
        if config is not None:
            _require_decoder_layers(model)
            load_intact_kv(model, config, _checkpoint_folder(pretrained_model_name_or_path, kwargs))
        return loaded

    setattr(from_pretrained, _MARK, True)
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign,assignment]


def _checkpoint_folder(source: str | os.PathLike[str] | None, kwargs: dict[str, Any]) -> Path:
    """The local folder holding the checkpoint: the one given, or the hub snapshot, side file fetched into it."""
    if source is None:
        raise ValueError(
            f"The model's config carries `{CONFIG_KEY}`, but it was not loaded from a checkpoint folder, so there "
            "is no prefix K/V to read. Load it from its folder, or attach the prefix with `attach_intact_kv`."
        )
    access = HubAccess(**{name: kwargs[name] for name in _HUB_ARGUMENTS if kwargs.get(name) is not None})
    return checkpoint_folder(source, access)


def _require_decoder_layers(model: PreTrainedModel) -> None:
    """A model whose config declares IntactKV but whose attention layers IntactKV cannot find must not load plain."""
    try:
        attention_modules(model)
    except TypeError as error:
        raise TypeError(
            f"{type(model).__name__}: the checkpoint declares IntactKV (`{CONFIG_KEY}` in config.json), but {error} "
            f"Load it with a decoder-only model class, or remove `{CONFIG_KEY}` from config.json to use it without "
            "IntactKV."
        ) from error
