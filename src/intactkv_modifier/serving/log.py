"""The serving side logs as part of vLLM: stdlib ``logging``, under vLLM's own logger.

vLLM configures its ``vllm`` logger (format, ``VLLM_LOGGING_LEVEL``,
``VLLM_LOGGING_CONFIG_PATH``) in every process it starts; a child of it inherits
all of that, so the plugin's lines look, filter and route like vLLM's. Outside
vLLM the logger is an ordinary stdlib one (warnings reach stderr, the rest is
silent), never loguru's default sink.
"""

import logging

__all__ = ["logger"]

logger = logging.getLogger("vllm.intactkv")
