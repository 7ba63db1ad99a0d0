"""Applying a checkpoint's intact prefix KV when transformers builds the model.

Importing :mod:`intactkv_modifier` wraps ``PreTrainedModel.post_init``, the one
step every transformers model runs at the end of ``__init__``, before
``from_pretrained`` loads weights. A model whose config carries the IntactKV
block gets its prefix buffers (so the stored tensors load with no unexpected-key
warning) and the splicing hooks; every other model is left untouched.

It also wraps the step where transformers materialises the keys a checkpoint did
not provide (or provided with another shape), so that a checkpoint whose config
announces IntactKV but whose tensors are absent or misshapen fails to load with
a clear error instead of attending to uninitialised memory.
"""

from __future__ import annotations

import functools
from typing import Any

from transformers import PreTrainedModel

from intactkv_modifier.architecture import attention_modules
from intactkv_modifier.config import CONFIG_KEY, KEY_BUFFER, VALUE_BUFFER, IntactKVConfig
from intactkv_modifier.storage import prepare_for_loading

__all__ = ["install_loading_hook"]

_MARK = "_intactkv_loading_hook"


def install_loading_hook() -> None:
    """Idempotent: importing the package twice, or reloading it, wraps only once."""
    original = PreTrainedModel.post_init
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def post_init(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        block = getattr(self.config, CONFIG_KEY, None)
        if block is not None and _is_decoder_with_layers(self):
            prepare_for_loading(self, IntactKVConfig.from_config_value(block))
        return result

    setattr(post_init, _MARK, True)
    PreTrainedModel.post_init = post_init  # type: ignore[method-assign]
    _guard_missing_prefix_tensors()


def _guard_missing_prefix_tensors() -> None:
    original = getattr(PreTrainedModel, "_move_missing_keys_from_meta_to_device", None)
    if original is None or getattr(original, _MARK, False):
        return  # another transformers version: the runtime's first-forward check still guards shapes

    @functools.wraps(original)
    def move_missing_keys(self: PreTrainedModel, missing_keys: Any, *args: Any, **kwargs: Any) -> Any:
        suffixes = (f".{KEY_BUFFER}", f".{VALUE_BUFFER}")
        absent = sorted(key for key in missing_keys if key.endswith(suffixes))
        if absent:
            raise ValueError(
                f"The checkpoint's config announces IntactKV ({CONFIG_KEY}) but {len(absent)} prefix tensors are "
                f"missing or have another shape than the config block declares, e.g. {absent[0]}. "
                "Re-export the checkpoint, or remove the block from config.json to load it without IntactKV."
            )
        block = getattr(self.config, CONFIG_KEY, None)
        if block is not None and _is_decoder_with_layers(self):
            _check_loaded_shapes(self, IntactKVConfig.from_config_value(block))
        return original(self, missing_keys, *args, **kwargs)

    setattr(move_missing_keys, _MARK, True)
    PreTrainedModel._move_missing_keys_from_meta_to_device = move_missing_keys  # type: ignore[method-assign]


def _check_loaded_shapes(model: PreTrainedModel, config: IntactKVConfig) -> None:
    """Transformers loads a buffer of another shape without complaint; the block is the contract."""
    for attention in attention_modules(model):
        for name in (KEY_BUFFER, VALUE_BUFFER):
            shape = tuple(getattr(attention, name).shape)
            if shape != config.buffer_shape:
                raise ValueError(
                    f"The checkpoint's IntactKV tensor `{name}` of layer {attention.layer_idx} has shape {shape}, "
                    f"but its config block declares {config.buffer_shape} "
                    f"({config.prefix_length} prefix tokens); the prefix KV does not match its config."
                )


def _is_decoder_with_layers(model: PreTrainedModel) -> bool:
    """Sub-models built on the way (embeddings-only towers, vision encoders) are skipped."""
    try:
        return bool(attention_modules(model))
    except TypeError:
        return False
