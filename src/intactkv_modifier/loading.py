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
from transformers.utils import cached_file

from intactkv_modifier.architecture import attention_modules
from intactkv_modifier.config import CONFIG_KEY
from intactkv_modifier.sidecar import SIDECAR_PATH
from intactkv_modifier.storage import config_of, load_intact_kv

__all__ = ["install_loading_hook"]

_MARK = "_intactkv_loading_hook"
#: ``from_pretrained`` arguments that say where a hub checkpoint's files come from.
_HUB_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


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
        if config is not None and _is_decoder_with_layers(model):
            load_intact_kv(model, config, _checkpoint_folder(pretrained_model_name_or_path, kwargs))
        return loaded

    setattr(from_pretrained, _MARK, True)
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign,assignment]


def _checkpoint_folder(source: str | os.PathLike[str] | None, kwargs: dict[str, Any]) -> Path:
    """The local folder holding the checkpoint: the one given, or the hub snapshot transformers downloaded to.

    For a hub id the side file is fetched into that snapshot first; it is optional
    there, since a checkpoint of the older layout keeps its tensors in the weight
    files already downloaded.
    """
    if source is None:
        raise ValueError(
            f"The model's config carries `{CONFIG_KEY}`, but it was not loaded from a checkpoint folder, so there "
            "is no prefix K/V to read. Load it from its folder, or attach the prefix with `attach_intact_kv`."
        )
    subfolder = kwargs.get("subfolder") or ""
    if Path(source).is_dir():
        return Path(source) / subfolder
    hub = {name: kwargs[name] for name in _HUB_ARGUMENTS if name in kwargs}
    cached_file(source, SIDECAR_PATH, _raise_exceptions_for_missing_entries=False, **hub)
    return Path(cached_file(source, "config.json", **hub)).parent


def _is_decoder_with_layers(model: PreTrainedModel) -> bool:
    """Sub-models built on the way (embeddings-only towers, vision encoders) are skipped."""
    try:
        return bool(attention_modules(model))
    except TypeError:
        return False
