"""IntactKV around any quantizer: capture before it runs, attach (and calibrate) after, save as usual.

llm-compressor lets :class:`~intactkv_modifier.IntactKVModifier` capture in
the middle of its pipeline; optimum's ``GPTQQuantizer``, optimum-quanto's
``quantize``/``freeze`` and transformers' load-time quantizers (``TorchAoConfig``,
``QuantoConfig``, ...) offer no such moment, so the full-precision model is
read before they run: the prefix K/V and, for IntactKV+Cal, the final hidden
states on the calibration samples. Any lossless transform the user applies
(a rotation, a smoothing scale) must come before the capture, so the K/V are
in the deployed model's basis.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from loguru import logger
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from intactkv_modifier.architecture import kv_geometry
from intactkv_modifier.calibration import (
    CalibrationSettings,
    CalibrationTargets,
    FitRecord,
    fit_attached_prefix,
    record_targets,
)
from intactkv_modifier.config import IntactKVConfig
from intactkv_modifier.integrations.settings import IntactKVSettings
from intactkv_modifier.integrations.structure import (
    DecoderStructure,
    UnfollowableModelError,
    check_prefix_reaches_attention,
    quantization_signs,
    transformers_model,
)
from intactkv_modifier.kv_readout import model_kv_for_prefix, replaced_error
from intactkv_modifier.prefix import resolve_prefix_token_ids, tokenizer_for
from intactkv_modifier.prefix_kv import PrefixKV
from intactkv_modifier.runtime import intact_kv_disabled
from intactkv_modifier.storage import attach_intact_kv, detach_intact_kv

__all__ = ["CalibrationData", "IntactPrefix"]

#: Calibration samples: a ``[samples, tokens]`` tensor, token-id rows, or batches of ``input_ids``
#: (and ``attention_mask``).
CalibrationData = torch.Tensor | Iterable[list[int]] | Iterable[dict]


@dataclass
class IntactPrefix:
    """The full-precision prefix K/V of one model, captured before it is quantized, to attach after.

    Example (optimum-quanto; any quantizer that works in place looks the same)::

        intact = IntactPrefix.capture(model, tokenizer)
        quantize(model, weights=qint4, exclude="lm_head")
        freeze(model)
        intact.attach(model)
        model.save_pretrained("model-w4-intactkv")   # weights, plus the side file and config block

    ``prefix_kv`` is the capture itself and never changes; :meth:`calibrate`
    attaches a fitted copy (``fit`` says how it went), and attaching again puts
    the capture back: the A/B comparison of IntactKV with and without +Cal on
    the same weights. ``targets`` exist when the capture was asked to calibrate.
    """

    prefix_token_ids: list[int]
    prefix_kv: PrefixKV
    structure: DecoderStructure
    settings: IntactKVSettings
    targets: CalibrationTargets | None = None
    fit: FitRecord | None = field(default=None, init=False)

    #: Where :meth:`attach` leaves the capture on the model, for :meth:`of`.
    ATTRIBUTE = "_intactkv_capture"

    @classmethod
    def of(cls, model: torch.nn.Module) -> IntactPrefix | None:
        """The capture attached to ``model`` in this process (None for a model loaded from a checkpoint)."""
        return vars(transformers_model(model)).get(cls.ATTRIBUTE)

    @classmethod
    def capture(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        settings: IntactKVSettings | dict | None = None,
        calibration_data: CalibrationData | None = None,
    ) -> IntactPrefix:
        """Read the prefix K/V (and IntactKV+Cal's targets) from ``model``, which must still be full precision.

        ``tokenizer`` (an object or a path) finds ``[BOS]`` or tokenizes
        ``prefix_text``; by default the one in the model's folder.
        ``calibration_data`` is needed when ``settings.calibration`` is set: its
        samples must start with the prefix.
        """
        model = transformers_model(model)
        settings = IntactKVSettings.model_validate(settings or {})
        signs = quantization_signs(model)
        if signs:
            raise ValueError(
                f"IntactPrefix.capture needs the full-precision model, but this one is quantized already ("
                f"{'; '.join(signs)}). Capture before quantizing: before quantize_model()/quantize(), or from the "
                "model loaded without quantization_config for a load-time quantizer."
            )
        prefix_ids = resolve_prefix_token_ids(
            prefix_token_ids=settings.prefix_token_ids,
            prefix_text=settings.prefix_text,
            tokenizer=_tokenizer(model, tokenizer, settings),
            max_positions=kv_geometry(model.config).max_position_embeddings,
        )
        with intact_kv_disabled(model):  # a model that carries a prefix already is read as it computes itself
            prefix_kv = model_kv_for_prefix(model, prefix_ids)
            targets = _targets(model, prefix_ids, settings.calibration, calibration_data)
        logger.info(f"IntactKV: captured the full-precision K/V of the prefix {prefix_ids}")
        return cls(prefix_ids, prefix_kv, DecoderStructure.of(model), settings, targets)

    def attach(self, model: torch.nn.Module) -> IntactKVConfig:
        """Give the quantized ``model`` the captured prefix K/V; it uses, saves and describes them from now on.

        Raises :class:`~intactkv_modifier.integrations.UnfollowableModelError`
        when the quantizer changed the decoder in a way IntactKV cannot apply
        the prefix to (attention replaced, layers or KV heads changed).
        """
        model = transformers_model(model)
        self.structure.check(model)
        config = attach_intact_kv(model, self.prefix_token_ids, self.prefix_kv)
        try:
            check_prefix_reaches_attention(model, self.prefix_token_ids)
        except UnfollowableModelError:
            detach_intact_kv(model)  # refused: the model computes as it did before
            raise
        replaced_error(model, self.prefix_token_ids, self.prefix_kv)
        vars(model)[self.ATTRIBUTE] = self
        return config

    def calibrate(self, model: torch.nn.Module, settings: CalibrationSettings | None = None) -> FitRecord:
        """IntactKV+Cal: fit the attached prefix K/V so the quantized model's outputs follow the captured ones.

        Needs gradients through the quantized model's layers (not its weights):
        kernels without a backward pass are refused with the reason.
        """
        model = transformers_model(model)
        settings = settings or self.settings.calibration
        if self.targets is None or settings is None:
            raise ValueError(
                "IntactPrefix.calibrate needs the full-precision targets, recorded at capture: capture with "
                "`settings={'calibration': {...}}` and `calibration_data=`."
            )
        try:
            self.fit = fit_attached_prefix(model, self.prefix_token_ids, self.targets, settings)
            return self.fit
        except (RuntimeError, NotImplementedError) as error:
            if "gets no gradient" not in str(error) and "derivative" not in str(error).lower():
                raise
            raise RuntimeError(
                f"IntactKV+Cal gets no gradient through this quantized model's layers ({error}). Its kernels have "
                "no backward pass: attach without calibrating, or quantize with a route that has one (optimum GPTQ "
                "through gptqmodel's torch kernel, optimum-quanto, torchao weight-only)."
            ) from error


def _tokenizer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | str | None, settings: IntactKVSettings
) -> PreTrainedTokenizerBase | None:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    return None if settings.prefix_token_ids is not None and tokenizer is None else tokenizer_for(model, tokenizer)


def _targets(
    model: PreTrainedModel,
    prefix_ids: list[int],
    settings: CalibrationSettings | None,
    data: CalibrationData | None,
) -> CalibrationTargets | None:
    if settings is None:
        return None
    if data is None:
        raise ValueError(
            "IntactKV calibration needs calibration data at capture (`calibration_data=`): the full-precision "
            "model's outputs on it are the targets the prefix is fitted to."
        )
    return record_targets(model, _batches(data), prefix_ids, settings.num_samples, settings.loss)


def _batches(data: CalibrationData) -> list[dict]:
    """Every accepted form as batches of ``input_ids``, which :func:`record_targets` reads."""
    if isinstance(data, torch.Tensor):
        return [{"input_ids": data}]
    batches = []
    for item in data:
        batches.append(dict(item) if isinstance(item, dict) else {"input_ids": torch.as_tensor(item)})
    return batches
