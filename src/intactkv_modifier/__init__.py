"""IntactKV for llm-compressor: keep the pivot tokens' KV cache in full precision.

Importing the package registers :class:`IntactKVModifier` with llm-compressor's
``ModifierFactory`` (so YAML recipes can name it). Transformers applies the
stored prefix KV of any checkpoint that carries one when it is loaded, in every
process where the package is installed, with or without this import (see
:mod:`_intactkv_autoload`; importing the package arms that hook even where
``INTACTKV_AUTOLOAD=0`` turned off the automatic one), and with or without
llm-compressor.

Without llm-compressor (the ``quantize`` extra) the modifier is not available;
the checkpoint format, the loading hook, the vLLM plugin
(:mod:`intactkv_modifier.serving`) and IntactKV for other quantizers
(:mod:`intactkv_modifier.integrations`: optimum, optimum-quanto, transformers'
load-time quantizers) are. vLLM pins a compressed-tensors release that
llm-compressor does not accept, so a serving environment cannot hold both, and
importing the plugin runs this file: there the names below are imported on
first use only.
"""

import importlib
import logging
import os
import sys
from typing import Any

from _intactkv_autoload import arm
from intactkv_modifier.config import CONFIG_KEY, IntactKVConfig

__version__ = "0.1.0"


def _import_llmcompressor_quietly() -> bool:
    """Import llm-compressor without its import-time "No accelerator available!" warning on CPU machines.

    A module-level constant of llm-compressor asks for the main device while it
    is imported; that warning says nothing to someone who imports this package.
    Its console level is raised for the import only, then its default logging
    (or the user's ``LLM_COMPRESSOR_LOG_*`` settings) is configured again. The
    same import loads transformers' quantizers, which import torchao wherever it
    is installed: a CPU build logs the CUDA kernels it lacks and torch's pytree
    warns about its Enum registrations, so those two loggers are raised for the
    import too.
    """
    if "llmcompressor" in sys.modules:  # imported already (its logging is set up), or blocked (None)
        return sys.modules["llmcompressor"] is not None
    saved = os.environ.get("LLM_COMPRESSOR_LOG_LEVEL")
    os.environ["LLM_COMPRESSOR_LOG_LEVEL"] = "ERROR"
    import_time_loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    saved_levels = [each.level for each in import_time_loggers]
    for each in import_time_loggers:
        each.setLevel(logging.ERROR)
    try:
        import llmcompressor
    except ImportError:
        return False
    finally:
        if saved is None:
            del os.environ["LLM_COMPRESSOR_LOG_LEVEL"]
        else:
            os.environ["LLM_COMPRESSOR_LOG_LEVEL"] = saved
        for each, level in zip(import_time_loggers, saved_levels):
            each.setLevel(level)
    llmcompressor.configure_logger(llmcompressor.LoggerConfig())
    return True


QUANTIZATION_AVAILABLE = _import_llmcompressor_quietly()
"""Whether llm-compressor imports, i.e. whether :class:`IntactKVModifier` is available."""

_NEEDS_QUANTIZE_EXTRA = ("IntactKVModifier", "capture_prefix_kv")
#: Public names that work without llm-compressor, and the module each lives in.
_WITHOUT_LLMCOMPRESSOR = {
    "PrefixKV": "intactkv_modifier.prefix_kv",
    "attach_intact_kv": "intactkv_modifier.storage",
    "config_of": "intactkv_modifier.storage",
    "intact_kv_disabled": "intactkv_modifier.runtime",
    "prefix_kv_of": "intactkv_modifier.storage",
}

__all__ = ["CONFIG_KEY", "QUANTIZATION_AVAILABLE", "IntactKVConfig", *_WITHOUT_LLMCOMPRESSOR]

if QUANTIZATION_AVAILABLE:
    from llmcompressor.modifiers.factory import ModifierFactory

    from intactkv_modifier.capture import capture_prefix_kv  # noqa: F401 (exported through __all__)
    from intactkv_modifier.modifier import IntactKVModifier
    from intactkv_modifier.prefix_kv import PrefixKV  # noqa: F401
    from intactkv_modifier.runtime import intact_kv_disabled  # noqa: F401
    from intactkv_modifier.storage import attach_intact_kv, config_of, prefix_kv_of  # noqa: F401

    __all__ += list(_NEEDS_QUANTIZE_EXTRA)
    ModifierFactory.register("IntactKVModifier", IntactKVModifier)
else:
    # stdlib logging, silent unless the program configures it: this line runs in every vLLM process of a serving
    # install, where loguru's default sink would print it
    logging.getLogger(__name__).debug(
        "llm-compressor is not installed: everything but the modifier loads (checkpoint format, loading hook, vLLM "
        "plugin, intactkv_modifier.integrations)"
    )

    def __getattr__(name: str) -> Any:
        if name in _WITHOUT_LLMCOMPRESSOR:
            return getattr(importlib.import_module(_WITHOUT_LLMCOMPRESSOR[name]), name)
        if name in _NEEDS_QUANTIZE_EXTRA:
            raise ImportError(
                f"intactkv_modifier.{name} needs llm-compressor, which is not installed: "
                "pip install 'intactkv-modifier[quantize]'"
            )
        raise AttributeError(f"module 'intactkv_modifier' has no attribute '{name}'")

arm()  # an explicit import asks for IntactKV: the hook even where INTACTKV_AUTOLOAD=0, without importing transformers
