"""IntactKV for llm-compressor: keep the pivot tokens' KV cache in full precision.

Importing the package registers :class:`IntactKVModifier` with llm-compressor's
``ModifierFactory`` (so YAML recipes can name it). Transformers applies the
stored prefix KV of any checkpoint that carries one when it is loaded, in every
process where the package is installed, with or without this import (see
:mod:`_intactkv_autoload`; importing the package arms that hook even where
``INTACTKV_AUTOLOAD=0`` turned off the automatic one), and with or without
llm-compressor.

Without llm-compressor (the ``quantize`` extra) the modifier, capture and
calibration are not available, only the checkpoint format, the loading hook and
the vLLM plugin (:mod:`intactkv_modifier.serving`): vLLM pins a
compressed-tensors release that llm-compressor does not accept, so a serving
environment cannot hold both, and importing the plugin runs this file.
"""

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
    (or the user's ``LLM_COMPRESSOR_LOG_*`` settings) is configured again.
    """
    if "llmcompressor" in sys.modules:  # imported already (its logging is set up), or blocked (None)
        return sys.modules["llmcompressor"] is not None
    saved = os.environ.get("LLM_COMPRESSOR_LOG_LEVEL")
    os.environ["LLM_COMPRESSOR_LOG_LEVEL"] = "ERROR"
    try:
        import llmcompressor
    except ImportError:
        return False
    finally:
        if saved is None:
            del os.environ["LLM_COMPRESSOR_LOG_LEVEL"]
        else:
            os.environ["LLM_COMPRESSOR_LOG_LEVEL"] = saved
    llmcompressor.configure_logger(llmcompressor.LoggerConfig())
    return True


QUANTIZATION_AVAILABLE = _import_llmcompressor_quietly()
"""Whether llm-compressor imports, i.e. whether the modifier, capture and calibration are available."""

_NEEDS_QUANTIZE_EXTRA = (
    "IntactKVModifier",
    "PrefixKV",
    "attach_intact_kv",
    "capture_prefix_kv",
    "config_of",
    "intact_kv_disabled",
    "prefix_kv_of",
)

__all__ = ["CONFIG_KEY", "QUANTIZATION_AVAILABLE", "IntactKVConfig"]

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
        "llm-compressor is not installed: the checkpoint format, loading hook and vLLM plugin load, not the modifier"
    )

    def __getattr__(name: str) -> Any:
        if name in _NEEDS_QUANTIZE_EXTRA:
            raise ImportError(
                f"intactkv_modifier.{name} needs llm-compressor, which is not installed: "
                "pip install 'intactkv-modifier[quantize]'"
            )
        raise AttributeError(f"module 'intactkv_modifier' has no attribute '{name}'")

arm()  # an explicit import asks for IntactKV: the hook even where INTACTKV_AUTOLOAD=0, without importing transformers
