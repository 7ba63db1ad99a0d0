"""Applying a checkpoint's intact prefix KV when transformers loads the model.

``PreTrainedModel.from_pretrained`` is wrapped by :mod:`_intactkv_autoload`, in
every process where the package is installed (its ``.pth`` file arms the wrapper
at interpreter start) and in any process that imports :mod:`intactkv_modifier`.
When the loaded model's config carries the IntactKV block, the wrapper calls
:func:`apply_stored_prefix`, which reads the prefix K/V from the checkpoint's
side file (or, for checkpoints written before it existed, from the weight files)
and gives the model its buffers and splicing hooks; every other model is
returned untouched, without importing this module.

Why after loading and not while building the model: transformers 5 builds models
on the meta device and fills only what the weight files hold. The prefix buffers
are non-persistent (so that no weight file holds them and vLLM can load the
weights), so transformers would leave them uninitialised; the finished model,
on its final devices, is the first point where they can be filled for real.

Nothing here needs llm-compressor: a serving or evaluation environment without
it applies stored prefixes all the same.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from _intactkv_autoload import arm
from intactkv_modifier.architecture import attention_modules
from intactkv_modifier.checkpoint import HubAccess, checkpoint_folder
from intactkv_modifier.config import CONFIG_KEY
from intactkv_modifier.storage import config_of, load_intact_kv

__all__ = ["apply_stored_prefix", "install_loading_hook"]

#: ``from_pretrained`` arguments that say where a hub checkpoint's files come from.
_HUB_ARGUMENTS = tuple(HubAccess.model_fields)


def install_loading_hook() -> None:
    """Make ``from_pretrained`` apply stored prefixes in this process; idempotent (one wrapper however often called)."""
    arm()


def apply_stored_prefix(
    model: PreTrainedModel, source: str | os.PathLike[str] | None, from_pretrained_kwargs: dict[str, Any]
) -> None:
    """Give ``model``, just loaded from ``source``, the prefix K/V its config block declares, or raise why not.

    ``from_pretrained_kwargs`` are the loading call's keyword arguments: a hub
    checkpoint's side file is fetched with the same revision, token and cache.
    """
    config = config_of(model)
    if config is None:
        return
    _require_decoder_layers(model)
    load_intact_kv(model, config, _checkpoint_folder(source, from_pretrained_kwargs))


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
