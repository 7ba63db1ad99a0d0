"""optimum's GPTQ with IntactKV: ``IntactKVGPTQQuantizer`` is a ``GPTQQuantizer`` that keeps the prefix intact.

``optimum.gptq.GPTQQuantizer`` (the engine behind transformers' ``GPTQConfig``,
with gptqmodel as its backend) quantizes a model in place in ``quantize_model``
and writes it with ``save``. This subclass captures the full-precision prefix
K/V before the first layer is quantized, attaches them after, optionally fits
them (IntactKV+Cal, on the quantizer's own calibration samples), and ``save``
writes the side file and config block with the GPTQ checkpoint, which
transformers (with gptqmodel) and vLLM load.

Two things optimum 2.3.0 does that a saved checkpoint cannot live with are set
right here, both measured on gptqmodel 7.6.0: ``save`` converts the weights to
GPTQ v1 but writes config.json with the v2 format it quantized in, so
transformers reloads them shifted by one quantization step (vLLM ignores the
field); and a pre-tokenized calibration set lands in ``quantization_config``,
where its tensors break config.json. ``save`` also converts the model back, so
it computes as before once saved.
"""

from __future__ import annotations

from typing import Any

import torch
from optimum.gptq import GPTQQuantizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from intactkv_modifier.integrations.intact_prefix import IntactPrefix
from intactkv_modifier.integrations.settings import IntactKVSettings

__all__ = ["IntactKVGPTQQuantizer"]


class IntactKVGPTQQuantizer(GPTQQuantizer):
    """``GPTQQuantizer`` (all of its arguments) that also stores the pivot prefix's full-precision K/V.

    Example::

        quantizer = IntactKVGPTQQuantizer(bits=4, group_size=64, dataset=calibration_rows,
                                          intactkv={"prefix_text": system_prompt})
        model = quantizer.quantize_model(model, tokenizer)
        quantizer.save(model, "smollm2-gptq-w4-intactkv")

    :param intactkv: :class:`~intactkv_modifier.integrations.IntactKVSettings`
        (or its fields as a dict): the prefix, and IntactKV+Cal's settings, which
        fit the prefix on ``dataset`` (token-id rows or texts, each starting with
        the prefix)
    """

    def __init__(self, *args: Any, intactkv: IntactKVSettings | dict | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.intactkv = IntactKVSettings.model_validate(intactkv or {})
        self.intact_prefix: IntactPrefix | None = None

    def quantize_model(self, model: torch.nn.Module, tokenizer: Any = None) -> torch.nn.Module:
        """Capture the prefix, run GPTQ, attach the prefix (and fit it with ``intactkv.calibration``)."""
        tokenizer = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer
        calibration = self._calibration_rows(tokenizer) if self.intactkv.calibration is not None else None
        self.intact_prefix = IntactPrefix.capture(model, tokenizer, self.intactkv, calibration)
        model = super().quantize_model(model, tokenizer)
        self.intact_prefix.attach(model)
        if self.intactkv.calibration is not None:
            self.intact_prefix.calibrate(model)
        return model

    def to_dict(self) -> dict[str, Any]:
        """optimum's dict, with a pre-tokenized ``dataset`` left out: config.json cannot hold its tensors."""
        values = super().to_dict()
        if not _is_json_dataset(values.get("dataset")):
            values["dataset"] = None
        return values

    def save(self, model: torch.nn.Module, save_dir: str, max_shard_size: str = "10GB",
             safe_serialization: bool = True) -> None:
        """optimum's save, with config.json naming the format the weights are written in; the side file and
        config block come with ``model.save_pretrained``. The model computes as before afterwards."""
        from gptqmodel.utils.model import hf_convert_gptq_v1_to_v2_format, hf_convert_gptq_v2_to_v1_format

        model, converted = hf_convert_gptq_v2_to_v1_format(
            model, self.sym, self.bits, self.quant_linear, self.format, self.meta
        )
        if converted:
            self.format = "gptq"
        model.config.quantization_config = self.to_dict()
        try:
            super().save(model, save_dir, max_shard_size=max_shard_size, safe_serialization=safe_serialization)
        finally:
            if converted:
                hf_convert_gptq_v1_to_v2_format(model, self.bits, self.quant_linear, "gptq", self.meta)
                self.format = "gptq_v2"
                model.config.quantization_config = self.to_dict()

    def _calibration_rows(self, tokenizer: PreTrainedTokenizerBase | None) -> list[Any]:
        """The GPTQ calibration samples as IntactKV+Cal reads them: tokenized, as optimum tokenizes texts."""
        if isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(
                "IntactKV calibration fits the prefix on the quantizer's own samples: pass `dataset` as token-id "
                "rows or texts that start with the prefix (not a dataset name)."
            )
        if all(isinstance(sample, str) for sample in self.dataset):
            if tokenizer is None:
                raise ValueError("IntactKV calibration on a text `dataset` needs the tokenizer: quantize_model(model, "
                                 "tokenizer)")
            return [tokenizer(text, return_tensors="pt") for text in self.dataset]
        return list(self.dataset)


def _is_json_dataset(dataset: object) -> bool:
    """A dataset name or a list of texts; tokenized samples (tensors, id lists) are not kept in config.json."""
    return dataset is None or isinstance(dataset, str) or (
        isinstance(dataset, list) and all(isinstance(sample, str) for sample in dataset)
    )
