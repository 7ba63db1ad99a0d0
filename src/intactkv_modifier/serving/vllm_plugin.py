"""The vLLM general plugin: ``vllm serve <IntactKV checkpoint>`` uses the stored prefix with no flag.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in
every process it starts, with no arguments and before it knows the model. So
``register`` only wraps ``EngineArgs.create_engine_config`` (which ``vllm serve``
and ``LLM(...)`` both go through); the wrapper, which does see the model, adds
the IntactKV KV connector (:mod:`intactkv_modifier.serving.vllm_connector`) to
the engine arguments when the model's config.json carries ``intactkv_config``,
and for any other model logs at debug level and changes nothing.

vLLM is imported only inside :func:`register`, so importing this module (or the
package) never needs vLLM. vLLM's own ``VLLM_PLUGINS`` allow-list turns the
plugin off (``VLLM_PLUGINS=""`` loads no general plugin).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loguru import logger

from intactkv_modifier.config import CONFIG_KEY, IntactKVConfig
from intactkv_modifier.serving.checkpoint import prefix_tensors_in_weight_files, read_config_block
from intactkv_modifier.sidecar import SIDECAR_PATH

__all__ = ["CONNECTOR_CLASS", "CONNECTOR_MODULE", "ConnectorDecision", "decide_connector", "register"]

CONNECTOR_CLASS = "IntactKVConnector"
CONNECTOR_MODULE = "intactkv_modifier.serving.vllm_connector"
#: KV cache dtypes that hold the prefix as stored (up to a float cast); fp8 and
#: other quantized caches would quantize the very K/V IntactKV keeps intact.
UNQUANTIZED_CACHE_DTYPES = ("auto", "bfloat16", "float16")

_MARK = "_intactkv_wrapped"


@dataclass(frozen=True)
class ConnectorDecision:
    """Whether to add the connector, and what to log about it at which level."""

    inject: bool
    level: Literal["DEBUG", "INFO", "WARNING"]
    message: str


def decide_connector(
    *,
    model: str,
    block: IntactKVConfig | None,
    kv_cache_dtype: str,
    kv_connector: str | None,
    kv_offloading_size: float | None,
) -> ConnectorDecision:
    """Pure decision, so every case is tested without vLLM.

    Anything that would make vLLM behave differently from its plain self for a
    model without the block is excluded first; a model with the block but a
    setting IntactKV cannot honour is served as plain vLLM, with a warning.
    """
    if block is None:
        return ConnectorDecision(False, "DEBUG", f"IntactKV: {model} has no `{CONFIG_KEY}`; vLLM runs unchanged")
    if kv_connector == CONNECTOR_CLASS:
        return ConnectorDecision(False, "INFO", f"IntactKV: the KV connector for {model} is already configured")
    if kv_connector is not None or kv_offloading_size is not None:
        other = kv_connector or "KV offloading"
        return ConnectorDecision(
            False,
            "WARNING",
            f"IntactKV: {model} carries a stored prefix K/V, but {other} is configured and vLLM runs one KV "
            f"connector; serving WITHOUT IntactKV. Combine both with vLLM's MultiConnector, naming "
            f"{{'kv_connector': '{CONNECTOR_CLASS}', 'kv_connector_module_path': '{CONNECTOR_MODULE}'}} first.",
        )
    if kv_cache_dtype not in UNQUANTIZED_CACHE_DTYPES:
        return ConnectorDecision(
            False,
            "WARNING",
            f"IntactKV: {model} carries a full-precision prefix K/V, but --kv-cache-dtype {kv_cache_dtype} would "
            "quantize it; serving WITHOUT IntactKV.",
        )
    serving = f"IntactKV: serving {model} with its stored K/V for prompts starting with {block.prefix_token_ids}"
    if block.kv_cache is not None:
        return ConnectorDecision(
            True,
            "WARNING",
            f"{serving}; its `kv_cache` quantization is a transformers cache that vLLM's paged cache does not "
            "implement, so vLLM keeps its own (unquantized) KV cache.",
        )
    return ConnectorDecision(True, "INFO", serving)


def register() -> None:
    """Entry point of ``vllm.general_plugins``; idempotent, since vLLM calls it once per process."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def create_engine_config(self: EngineArgs, *args: Any, **kwargs: Any) -> Any:
        _configure(self)
        return original(self, *args, **kwargs)

    setattr(create_engine_config, _MARK, True)
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


def _configure(engine_args: Any) -> None:
    """Add the IntactKV connector to ``engine_args`` when its model carries the block."""
    from vllm.config import KVTransferConfig

    model = engine_args.hf_config_path or engine_args.model
    transfer = engine_args.kv_transfer_config
    decision = decide_connector(
        model=model,
        block=_config_block(model, engine_args.revision),
        kv_cache_dtype=str(engine_args.kv_cache_dtype),
        kv_connector=None if transfer is None else transfer.kv_connector,
        kv_offloading_size=getattr(engine_args, "kv_offloading_size", None),
    )
    logger.log(decision.level, decision.message)
    if not decision.inject:
        return
    if Path(model).is_dir() and (holding := prefix_tensors_in_weight_files(model)):
        raise ValueError(
            f"{model}: {holding} hold the IntactKV prefix tensors (`...self_attn.intact_key/intact_value`), which "
            "vLLM's weight loader rejects as unknown parameters. Re-export the checkpoint with an intactkv-modifier "
            f"that stores them in {SIDECAR_PATH}."
        )
    engine_args.kv_transfer_config = KVTransferConfig(
        kv_connector=CONNECTOR_CLASS, kv_connector_module_path=CONNECTOR_MODULE, kv_role="kv_both"
    )


def _config_block(model: str, revision: str | None) -> IntactKVConfig | None:
    """The block of a local folder or a hub model; ``None`` for anything that has no config.json to read."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    path = Path(model)
    if path.is_dir():
        return read_config_block(path) if (path / "config.json").is_file() else None
    if path.exists():
        return None  # a single weights file (GGUF): no config.json of ours
    try:
        config_file = hf_hub_download(model, "config.json", revision=revision)
    except (OSError, ValueError, EntryNotFoundError) as error:
        logger.debug(f"IntactKV: cannot read config.json of {model} ({error}); vLLM runs unchanged")
        return None
    return read_config_block(Path(config_file).parent)
