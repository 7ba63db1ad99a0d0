"""optimum-quanto with IntactKV: quantize, freeze, save and reload with the full-precision prefix K/V.

optimum-quanto quantizes in place (``quantize(model, weights=qint4)``, then
``freeze(model)``) and saves through ``QuantizedModelForCausalLM``, whose
``from_pretrained`` rebuilds the model with ``from_config`` and re-quantizes
it. That reload never passes through transformers' ``from_pretrained``, which
is where an installed intactkv-modifier applies stored prefixes, so
``IntactKVQuantizedModelForCausalLM.from_pretrained`` applies it itself; the
plain optimum-quanto class reloads such a checkpoint without its prefix.
"""

from __future__ import annotations

import os
from typing import Any

from optimum.quanto import QuantizedModelForCausalLM
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from intactkv_modifier.integrations.intact_prefix import CalibrationData, IntactPrefix
from intactkv_modifier.integrations.settings import IntactKVSettings
from intactkv_modifier.loading import apply_stored_prefix

__all__ = ["IntactKVQuantizedModelForCausalLM"]


class IntactKVQuantizedModelForCausalLM(QuantizedModelForCausalLM):
    """optimum-quanto's ``QuantizedModelForCausalLM`` that keeps the pivot prefix's full-precision K/V.

    Example::

        qmodel = IntactKVQuantizedModelForCausalLM.quantize(model, weights=qint4, exclude="lm_head")
        qmodel.save_pretrained("gemma-quanto-int4-intactkv")
        qmodel = IntactKVQuantizedModelForCausalLM.from_pretrained("gemma-quanto-int4-intactkv")
    """

    @classmethod
    def quantize(
        cls,
        model: PreTrainedModel,
        weights: Any = None,
        activations: Any = None,
        optimizer: Any = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        *,
        intactkv: IntactKVSettings | dict | None = None,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        calibration_data: CalibrationData | None = None,
    ) -> IntactKVQuantizedModelForCausalLM:
        """optimum-quanto's ``quantize`` (quantize, then freeze), with the prefix captured before and attached
        after; with ``intactkv.calibration`` the prefix is then fitted on ``calibration_data``."""
        intact = IntactPrefix.capture(model, tokenizer, intactkv, calibration_data)
        quantized = super().quantize(
            model, weights=weights, activations=activations, optimizer=optimizer, include=include, exclude=exclude
        )
        intact.attach(quantized)
        if intact.settings.calibration is not None:
            intact.calibrate(quantized)
        return quantized

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any
    ) -> IntactKVQuantizedModelForCausalLM:
        """optimum-quanto's reload, then the checkpoint's stored prefix (or an error saying why it cannot load)."""
        quantized = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        apply_stored_prefix(quantized._wrapped, pretrained_model_name_or_path, kwargs)
        return quantized
