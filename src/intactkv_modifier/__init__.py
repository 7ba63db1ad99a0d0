"""IntactKV for llm-compressor: keep the pivot tokens' KV cache in full precision.

Importing the package registers :class:`IntactKVModifier` with llm-compressor's
``ModifierFactory`` (so YAML recipes can name it) and makes transformers apply
the stored prefix KV of any checkpoint that carries one when it is loaded.
"""

from llmcompressor.modifiers.factory import ModifierFactory

from intactkv_modifier.capture import PrefixKV, capture_prefix_kv
from intactkv_modifier.config import CONFIG_KEY, IntactKVConfig
from intactkv_modifier.loading import install_loading_hook
from intactkv_modifier.modifier import IntactKVModifier
from intactkv_modifier.runtime import intact_kv_disabled
from intactkv_modifier.storage import attach_intact_kv, config_of, prefix_kv_of

__all__ = [
    "CONFIG_KEY",
    "IntactKVConfig",
    "IntactKVModifier",
    "PrefixKV",
    "attach_intact_kv",
    "capture_prefix_kv",
    "config_of",
    "intact_kv_disabled",
    "prefix_kv_of",
]

__version__ = "0.1.0"

ModifierFactory.register("IntactKVModifier", IntactKVModifier)
install_loading_hook()
