"""Making a model use the quantized KV cache wherever it would start a fresh full-precision one.

A forward pre-hook on the decoder stack swaps ``past_key_values`` for a new
:class:`~intactkv_modifier.kv_quant.cache.KeyFavoredQuantizedCache` when the call
would otherwise start an empty ``DynamicCache``: no cache with ``use_cache``
on, or the empty ``DynamicCache`` that ``generate()`` prepares. The model returns
the cache it used, and ``generate()`` carries that object on, so every decoding
step reads and writes the quantized cache. A cache the caller filled or chose
(a non-empty one, any other class, one passed to ``generate``) is left alone.
An empty ``DynamicCache`` passed to a plain forward looks exactly like
``generate``'s and is replaced too: code that reads back its own cache runs
inside :meth:`KVQuantization.suspended`, or under
:func:`~intactkv_modifier.capture.full_precision_forward` (prefix capture), which
silences this hook with every other.

It composes with IntactKV: the splice proxy wraps whatever cache the attention
layer receives and calls its ``update`` with the prefix replaced, so the
intact prefix KV lands in the cache's full-precision prefix slots.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from loguru import logger
from transformers import DynamicCache, PreTrainedModel

from intactkv_modifier.architecture import decoder_stack
from intactkv_modifier.kv_quant.attention import (
    base_implementation,
    packed_implementation,
    supports_packed_attention,
)
from intactkv_modifier.kv_quant.cache import KeyFavoredQuantizedCache
from intactkv_modifier.kv_quant.settings import KVQuantSettings
from intactkv_modifier.padding import first_attended_positions
from intactkv_modifier.runtime import IntactKVRuntime

__all__ = ["KVQuantization", "install_kv_quantization", "kv_quantization_of", "left_padding", "remove_kv_quantization"]


class KVQuantization:
    """The installed hook of one decoder stack; remove it with :meth:`remove`.

    :param full_precision_prefix: tokens kept in full precision at the start of
        every row; ``None`` follows the model's IntactKV prefix (its length when
        the model carries one, else 0)
    :param packed_attention: switch the model to the packed attention
        implementation over its current one (eager or sdpa), so that decoding
        reads the packed codes instead of a dequantized copy of the past;
        :meth:`remove` switches it back
    """

    ATTRIBUTE = "_intactkv_kv_quantization"

    def __init__(
        self,
        model: PreTrainedModel,
        settings: KVQuantSettings,
        full_precision_prefix: int | None,
        packed_attention: bool = True,
    ):
        self._model = model
        self._config = model.config
        self._decoder = decoder_stack(model)
        self.settings = settings
        self.full_precision_prefix = full_precision_prefix
        self._suspended = False
        self._handle = self._decoder.register_forward_pre_hook(self._use_quantized_cache, with_kwargs=True)
        self.use_packed_attention(packed_attention)

    def use_packed_attention(self, packed: bool) -> None:
        """Decode with the packed attention path (``True``) or the reference path (dequantize, then attend)."""
        current = self._config._attn_implementation
        if packed and not supports_packed_attention(current):
            logger.warning(
                f"KV-cache quantization: attention implementation {current!r} cannot read the packed cache; "
                "decoding dequantizes the past every step (use eager or sdpa for the packed path)"
            )
            return
        wanted = packed_implementation(current) if packed else base_implementation(current)
        if wanted != current:
            self._model.set_attn_implementation(wanted)

    def new_cache(self, attention_mask: torch.Tensor | None = None) -> KeyFavoredQuantizedCache:
        """An empty cache for a batch whose padding ``attention_mask`` (``[batch, tokens]``) shows."""
        return KeyFavoredQuantizedCache(
            self._config,
            self.settings,
            full_precision_prefix=self.prefix_length(),
            left_padding=left_padding(attention_mask),
        )

    def prefix_length(self) -> int:
        if self.full_precision_prefix is not None:
            return self.full_precision_prefix
        runtime = getattr(self._decoder, IntactKVRuntime.ATTRIBUTE, None)
        return 0 if runtime is None else len(runtime.prefix_token_ids)

    def remove(self) -> None:
        self._handle.remove()
        self.use_packed_attention(False)
        if getattr(self._decoder, self.ATTRIBUTE, None) is self:
            delattr(self._decoder, self.ATTRIBUTE)

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Run forwards with whatever cache they are given, e.g. to read back an explicit ``DynamicCache``."""
        suspended, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = suspended

    def _use_quantized_cache(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # full_precision_forward (prefix capture, calibration targets) silences every hook, this one included;
        # training never decodes, and a cache handed to the layers would be written even with use_cache forced off
        if self._suspended or _llm_compressor_hooks_disabled() or module.training:
            return None
        use_cache = kwargs.get("use_cache")
        if not (getattr(self._config, "use_cache", True) if use_cache is None else use_cache):
            return None
        past = kwargs.get("past_key_values")
        fresh = past is None or (
            type(past) is DynamicCache and past.get_seq_length() == 0 and not getattr(past, "_is_user_defined", False)
        )
        if not fresh:
            return None
        kwargs["past_key_values"] = self.new_cache(kwargs.get("attention_mask"))
        return args, kwargs


def _llm_compressor_hooks_disabled() -> bool:
    """llm-compressor's global hook switch, read only where llm-compressor is loaded: a checkpoint that records a
    KV-cache quantization loads (and decodes) without it, and where it is not loaded no hook was silenced."""
    hooks = sys.modules.get("llmcompressor.modifiers.utils.hooks")
    return hooks is not None and hooks.HooksMixin._HOOKS_DISABLED


def left_padding(attention_mask: torch.Tensor | None) -> list[int] | None:
    """Leading zeros of each row of a 2-D attention mask (all of it for an empty row); ``None`` without one."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return first_attended_positions(attention_mask).tolist()


def install_kv_quantization(
    model: PreTrainedModel,
    settings: KVQuantSettings,
    full_precision_prefix: int | None = None,
    packed_attention: bool = True,
) -> KVQuantization:
    """Make ``model`` quantize its KV cache with ``settings``; a second call replaces the settings.

    Settings the model cannot use (a group size that does not divide its head
    dim, a wrong number of per-layer overrides) fail here, not at the first forward.
    ``packed_attention=False`` keeps the reference path (see :class:`KVQuantization`).
    """
    KeyFavoredQuantizedCache(model.config, settings)  # validates against the model
    existing = kv_quantization_of(model)
    if existing is not None:
        existing.settings = settings
        existing.full_precision_prefix = full_precision_prefix
        existing.use_packed_attention(packed_attention)
        return existing
    hook = KVQuantization(model, settings, full_precision_prefix, packed_attention)
    object.__setattr__(decoder_stack(model), KVQuantization.ATTRIBUTE, hook)
    logger.info(
        f"KV-cache quantization: {settings.label()}; the prefix and up to the newest "
        f"{settings.full_precision_tokens()} tokens of each layer stay in full precision"
    )
    return hook


def kv_quantization_of(model: PreTrainedModel) -> KVQuantization | None:
    return getattr(decoder_stack(model), KVQuantization.ATTRIBUTE, None)


def remove_kv_quantization(model: PreTrainedModel) -> None:
    """Back to transformers' own full-precision cache; a no-op when none is installed."""
    hook = kv_quantization_of(model)
    if hook is not None:
        hook.remove()

