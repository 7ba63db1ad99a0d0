"""transformers' load-time quantizers with IntactKV: ``TorchAoConfig``, ``QuantoConfig``, ``HqqConfig``, ...

These quantize while ``from_pretrained`` loads the weights, so the
full-precision model exists only in a load of its own: it is loaded once to
capture the prefix (and IntactKV+Cal's targets), freed, and the model is
loaded again with the quantization config. Whether the result can be saved is
the quantizer's business (transformers 5.17: torchao yes, quanto no); where it
can, ``save_pretrained`` writes the side file and config block, and
``from_pretrained`` applies them on reload.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from intactkv_modifier.integrations.intact_prefix import CalibrationData, IntactPrefix
from intactkv_modifier.integrations.settings import IntactKVSettings

__all__ = ["load_quantized"]


def load_quantized(
    source: str | os.PathLike[str],
    quantization_config: Any,
    *,
    intactkv: IntactKVSettings | dict | None = None,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    calibration_data: CalibrationData | None = None,
    model_class: Any = AutoModelForCausalLM,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """``model_class.from_pretrained(source, quantization_config=...)`` with the full-precision prefix attached.

    Example::

        config = TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)))
        model = load_quantized("gemma-3-270m", config, dtype=torch.float32)
        model.save_pretrained("gemma-torchao-int4-intactkv")

    Peak memory is one model at a time: the full-precision one is freed before
    the quantized one loads.
    """
    full_precision = model_class.from_pretrained(source, **from_pretrained_kwargs)
    intact = IntactPrefix.capture(full_precision, tokenizer, intactkv, calibration_data)
    del full_precision
    gc.collect()
    model = model_class.from_pretrained(source, quantization_config=quantization_config, **from_pretrained_kwargs)
    intact.attach(model)
    if intact.settings.calibration is not None:
        intact.calibrate(model)
    return model
