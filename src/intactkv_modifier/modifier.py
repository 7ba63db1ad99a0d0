"""``IntactKVModifier``: keep the pivot tokens' KV cache in full precision.

When the prefix KV is captured is the whole difficulty. It must be in the basis
of the *deployed* model (after SpinQuant/QuIP rotations and AWQ/SmoothQuant
scaling) yet computed with full-precision weights. In llm-compressor's default
``independent`` pipeline each modifier calibrates in turn, in recipe order, and
only weight quantizers (GPTQ, QuantizationModifier, AutoRound) switch layers to
the ``CALIBRATION`` quantization status when their own calibration starts, after
every earlier transform has run and before any weight is rounded. So the
modifier captures at the first moment a layer runs while a quantizer is
calibrating (a forward pre-hook on the first decoder layer), with fake-quant
off; for data-free quantizers, which run no forward, it captures at its own
calibration, and at the latest at finalize. Its position in the recipe does not
matter.
"""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.quantization import QuantizationStatus
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from intactkv_modifier.architecture import attention_modules, kv_geometry
from intactkv_modifier.calibration import (
    CalibrationSettings,
    CalibrationTargets,
    fit_attached_prefix,
    record_targets,
)
from intactkv_modifier.capture import capture_prefix_kv, full_precision_forward
from intactkv_modifier.chat_template import ChatTemplatePrefix
from intactkv_modifier.kv_quant.allocation import NormKind, allocate_bits
from intactkv_modifier.kv_quant.settings import KVQuantSettings
from intactkv_modifier.kv_readout import replaced_error
from intactkv_modifier.prefix import resolve_prefix_token_ids, tokenizer_for
from intactkv_modifier.prefix_kv import PrefixKV
from intactkv_modifier.storage import attach_intact_kv

__all__ = ["IntactKVModifier"]

_CALIBRATING = (QuantizationStatus.CALIBRATION, QuantizationStatus.FROZEN, QuantizationStatus.COMPRESSED)


class IntactKVModifier(Modifier):
    """Store the full-precision KV of the prompt prefix and use it instead of the quantized model's.

    Place it anywhere in a recipe with a weight quantizer (after GPTQ/AWQ/rotations
    reads naturally). After ``oneshot`` the model carries the prefix KV, uses it in
    ``forward``/``generate``, and ``save_pretrained`` writes it into the checkpoint.
    For a chat model, keep its whole system turn (the paper's main setting)::

        IntactKVModifier:
          prefix_chat_template: true      # or "You are ..." for your own system prompt
          calibration: {epochs: 5, batch_size: 4, lr: 1.0e-3}   # optional: IntactKV+Cal

    :param prefix_token_ids: explicit prefix token ids (e.g. ``[1]``)
    :param prefix_text: fixed text every prompt starts with; tokenized with the
        model's tokenizer, special tokens included
    :param prefix_chat_template: the prefix is the system part of the tokenizer's chat
        template, rendered before the first user turn: ``true`` for the template's
        default system prompt, a string (or ``{system_prompt: ...}``) for your own; see
        :class:`~intactkv_modifier.chat_template.ChatTemplatePrefix`. The way to say it for
        a chat model (tokenizers without BOS included)
    :param tokenizer: path or hub id of the tokenizer; defaults to the model's own
        folder. Needed unless ``prefix_token_ids`` is given.
    :param calibration: when set, fit the stored K/V to the FP model's outputs on
        oneshot's calibration samples after quantization (IntactKV+Cal); see
        :class:`~intactkv_modifier.calibration.CalibrationSettings`
    :param kv_cache: quantize the KV cache the model decodes with, keys and
        values separately (default K4V2: keys 4-bit per channel, values 2-bit per
        token), the intact prefix kept in full precision; recorded in the
        checkpoint so that loading applies it. See
        :class:`~intactkv_modifier.kv_quant.settings.KVQuantSettings`
    :param kv_cache_bit_budget: choose each layer's key/value bits from the K/V
        projections' norms (``kv_cache_norm``) so that they average this many
        bits; measured on the full-precision weights in the deployed basis, when
        the prefix is captured. Grouping and the residual window come from
        ``kv_cache`` (or its defaults)
    :param kv_cache_norm: ``frobenius`` or ``spectral`` (arXiv 2502.15075 motivates both)
    """

    prefix_token_ids: list[int] | None = Field(default=None, min_length=1)
    prefix_text: str | None = Field(default=None, min_length=1)
    prefix_chat_template: ChatTemplatePrefix | None = None
    tokenizer: str | None = None
    calibration: CalibrationSettings | None = None
    kv_cache: KVQuantSettings | None = None
    kv_cache_bit_budget: float | None = Field(default=None, ge=2, le=8)
    kv_cache_norm: NormKind = "frobenius"

    _prefix_ids: list[int] = PrivateAttr(default_factory=list)
    _captured: PrefixKV | None = PrivateAttr(default=None)
    _calibration_data: Any = PrivateAttr(default=None)
    _targets: CalibrationTargets | None = PrivateAttr(default=None)
    _calibration_seconds: float | None = PrivateAttr(default=None)
    _kv_cache: KVQuantSettings | None = PrivateAttr(default=None)

    @field_validator("prefix_chat_template", mode="before")
    @classmethod
    def _chat_template_shorthand(cls, value: Any) -> Any:
        """``true`` -> the template's default system prompt; a string -> that system prompt; ``false`` -> off."""
        if value is True:
            return ChatTemplatePrefix()
        if value is False:
            return None
        return ChatTemplatePrefix(system_prompt=value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_prefix_setting(self) -> IntactKVModifier:
        given = [name for name in ("prefix_token_ids", "prefix_text", "prefix_chat_template")
                 if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"IntactKVModifier takes one of {given}, not both: they name the prefix twice")
        return self

    def prefix_for(self, tokenizer: PreTrainedTokenizerBase | None, max_positions: int | None = None) -> list[int]:
        """The prefix ids this modifier stores with ``tokenizer``: what calibration and evaluation prompts of
        its checkpoint must start with."""
        return resolve_prefix_token_ids(
            prefix_token_ids=self.prefix_token_ids,
            prefix_text=self.prefix_text,
            chat_template=self.prefix_chat_template,
            tokenizer=tokenizer,
            max_positions=max_positions,
        )

    @property
    def resolved_prefix_token_ids(self) -> list[int]:
        return list(self._prefix_ids)

    @property
    def captured_prefix_kv(self) -> PrefixKV | None:
        """The full-precision prefix KV as captured, before any calibration: for A/B comparisons."""
        return self._captured

    @property
    def kv_cache_settings(self) -> KVQuantSettings | None:
        """The KV-cache quantization the model got (per-layer bits filled in under a bit budget)."""
        return self._kv_cache

    @property
    def calibration_seconds(self) -> float | None:
        """Wall time of the last IntactKV+Cal fit (``None`` without calibration)."""
        return self._calibration_seconds

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        model = state.model
        attentions = attention_modules(model)
        tokenizer = None if self.prefix_token_ids is not None else tokenizer_for(model, self.tokenizer)
        self._prefix_ids = self.prefix_for(tokenizer, kv_geometry(model.config).max_position_embeddings)
        self._captured = None
        self._targets = None
        self._kv_cache = self.kv_cache
        if self.kv_cache is not None:
            self.kv_cache.check_model(kv_geometry(model.config))  # a bad group size fails now, not after oneshot
        self._calibration_data = state.data.calib if state.data is not None else None
        if self.calibration is not None and self._calibration_data is None:
            raise ValueError("IntactKV calibration needs calibration data: pass `dataset=` to oneshot.")

        def capture_when_quantizer_calibrates(module: torch.nn.Module, args: tuple) -> None:
            if self._captured is None and _quantizer_started(model):
                self._capture(model, "first forward of weight-quantizer calibration")

        self.register_hook(attentions[0], capture_when_quantizer_calibrates, "forward_pre")
        logger.info(f"IntactKV: prefix token ids {self._prefix_ids} ({len(attentions)} attention layers)")
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs: Any) -> None:
        if self._captured is None and _quantizer_started(state.model):
            self._capture(state.model, "calibration start (data-free quantizer already calibrated)")

    def on_finalize(self, state: State, **kwargs: Any) -> bool:
        model = state.model
        self.remove_hooks()
        if self._captured is None:
            self._capture(model, "finalize (no quantizer calibrated with data)")
        self._log_replaced_error(model)
        attach_intact_kv(model, self._prefix_ids, self._captured, kv_cache=self._kv_cache)
        if self._targets is not None:
            self._calibrate(model)
        return True

    # internals -------------------------------------------------------------

    def _capture(self, model: PreTrainedModel, moment: str) -> None:
        self._captured = capture_prefix_kv(model, self._prefix_ids)
        logger.info(f"IntactKV: captured full-precision prefix KV at {moment}")
        if self.kv_cache_bit_budget is not None:
            # the weights are not rounded yet: the norms are the full-precision projections'
            allocation = allocate_bits(model, self.kv_cache_bit_budget, base=self.kv_cache, norm=self.kv_cache_norm)
            self._kv_cache = allocation.settings
        if self.calibration is not None:
            with full_precision_forward(model):
                self._targets = record_targets(
                    model, self._calibration_data, self._prefix_ids, self.calibration.num_samples,
                    self.calibration.loss,
                )

    def _calibrate(self, model: PreTrainedModel) -> None:
        assert self._targets is not None and self.calibration is not None
        fit = fit_attached_prefix(model, self._prefix_ids, self._targets, self.calibration, kv_cache=self._kv_cache)
        self._calibration_seconds = fit.seconds
        self._targets = None

    def _log_replaced_error(self, model: PreTrainedModel) -> None:
        assert self._captured is not None
        replaced_error(model, self._prefix_ids, self._captured)


def _quantizer_started(model: torch.nn.Module) -> bool:
    return any(getattr(module, "quantization_status", None) in _CALIBRATING for module in model.modules())
