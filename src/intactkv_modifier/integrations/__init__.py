"""IntactKV for quantizers other than llm-compressor: capture before they run, attach after, one checkpoint format.

- :mod:`.intact_prefix`: :class:`IntactPrefix`, the quantizer-neutral API (``capture`` on the full-precision
  model, ``attach`` and ``calibrate`` on the quantized one, then the model's own ``save_pretrained``);
- :mod:`.settings`: :class:`IntactKVSettings`, the prefix and IntactKV+Cal's settings;
- :mod:`.structure`: what a quantizer may change in the decoder, and the refusal when IntactKV cannot follow;
- :mod:`.optimum_gptq`: ``IntactKVGPTQQuantizer``, optimum's ``GPTQQuantizer`` with the prefix (needs optimum and
  gptqmodel: the ``optimum`` extra);
- :mod:`.quanto`: ``IntactKVQuantizedModelForCausalLM``, optimum-quanto's class with the prefix (``quanto`` extra);
- :mod:`.load_time`: :func:`load_quantized`, for transformers' load-time quantizers (``TorchAoConfig``, ...).

The checkpoint is the one llm-compressor runs write: the quantizer's own files plus
``intactkv/prefix_kv.safetensors`` and the ``intactkv_config`` block (:mod:`intactkv_modifier.checkpoint`).
Nothing here needs llm-compressor.
"""

from intactkv_modifier.integrations.intact_prefix import CalibrationData, IntactPrefix
from intactkv_modifier.integrations.load_time import load_quantized
from intactkv_modifier.integrations.settings import IntactKVSettings
from intactkv_modifier.integrations.structure import UnfollowableModelError

__all__ = ["CalibrationData", "IntactKVSettings", "IntactPrefix", "UnfollowableModelError", "load_quantized"]
