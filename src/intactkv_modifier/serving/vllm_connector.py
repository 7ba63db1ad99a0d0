"""vLLM KV connector that fills the pivot prefix's KV slots with the checkpoint's stored K/V.

vLLM loads this module by path (``kv_connector_module_path``) once the plugin
(:mod:`intactkv_modifier.serving.vllm_plugin`) has configured it; nothing else
imports it, so it may import vLLM at the top.

Scheduler side: for a prompt that starts with the stored prefix, the prefix
positions vLLM does not already hold are reported as externally computed, so
vLLM allocates their slots and does not compute them. Worker side: before the
forward pass of that step, the stored K/V are scattered into those slots (one
scatter per layer), so every later token attends to the full-precision prefix.
Everything that decides *what* goes *where* lives in the vLLM-free modules
:mod:`~intactkv_modifier.serving.matching` and :mod:`~intactkv_modifier.serving.paged`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from loguru import logger
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from intactkv_modifier.checkpoint import checkpoint_folder, read_prefix
from intactkv_modifier.config import CONFIG_KEY, IntactKVConfig
from intactkv_modifier.serving.matching import loadable_prefix_end, prefix_positions_to_load, starts_with_prefix
from intactkv_modifier.serving.paged import (
    PrefixLoad,
    check_cache_layout,
    kv_head_slice,
    layer_index_of,
    pack_layer,
    slot_indices,
    write_prefix,
)
from intactkv_modifier.serving.vllm_plugin import hub_access

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["IntactKVConnector", "IntactKVConnectorMetadata"]

_FLOAT_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class IntactKVConnectorMetadata(KVConnectorMetadata):
    """The prefix loads of one scheduler step, sent to every worker."""

    loads: list[PrefixLoad] = field(default_factory=list)


class IntactKVConnector(KVConnectorBase_V1):
    """Loads the stored pivot-prefix K/V into vLLM's paged cache; saves nothing."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, role, kv_cache_config)
        block = getattr(vllm_config.model_config.hf_config, CONFIG_KEY, None)
        if block is None:
            raise ValueError(
                f"{type(self).__name__} is configured, but {vllm_config.model_config.model} has no "
                f"`{CONFIG_KEY}` in its config.json; remove the KV connector or serve an IntactKV checkpoint."
            )
        self._config = IntactKVConfig.from_config_value(block)
        self._prefix = tuple(self._config.prefix_token_ids)
        parallel = vllm_config.parallel_config
        if parallel.decode_context_parallel_size > 1 or parallel.prefill_context_parallel_size > 1:
            raise ValueError("IntactKV serving does not support context parallelism (it splits a block's tokens)")
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(
                f"IntactKV serving needs every attention layer in one KV cache group; this model has {len(groups)}"
            )
        self._block_size: int = groups[0].kv_cache_spec.block_size
        # scheduler side
        self._pending: list[PrefixLoad] = []
        self._block_pool: BlockPool | None = None
        # worker side: (cache, packed prefix rows) per attention layer of this rank
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._kernel_block_size = 0

    # ------------------------------------------------------------------ scheduler side

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        self._block_pool = gpu_block_pool

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        if _needs_every_prompt_position(request):
            return 0, False
        window = prefix_positions_to_load(
            request.prompt_token_ids, self._prefix, num_computed_tokens, request.num_tokens
        )
        return len(window), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        (block_ids,) = blocks.get_block_ids()
        if num_external_tokens:
            end = loadable_prefix_end(len(self._prefix), request.num_tokens)
            self._pending.append(PrefixLoad(tuple(block_ids), end - num_external_tokens, end))
        elif _needs_every_prompt_position(request) and starts_with_prefix(request.prompt_token_ids, self._prefix):
            # Computed without the stored prefix: keep those blocks out of the prefix
            # cache, or later requests sharing their tokens would reuse quantized prefix K/V.
            self._forget_cached(block_ids[: -(-len(self._prefix) // self._block_size)])

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> IntactKVConnectorMetadata:
        metadata = IntactKVConnectorMetadata(loads=self._pending)
        self._pending = []
        return metadata

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        prompt = request.prompt_token_ids
        if prompt is not None and list(prompt) == list(self._prefix):
            # The prompt was the bare prefix: its last token had to be computed, not loaded,
            # so the block holding it must not serve later requests from the prefix cache.
            self._forget_cached(block_ids[(len(self._prefix) - 1) // self._block_size :][:1])
        return False, None

    def _forget_cached(self, block_ids: list[int]) -> None:
        if self._block_pool is None:
            logger.warning("IntactKV: vLLM gave the connector no block pool; prefix-cache entries may mix K/V kinds")
            return
        self._block_pool.evict_blocks(set(block_ids))

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        model_config = self._vllm_config.model_config
        stored = read_prefix(checkpoint_folder(model_config.model, hub_access(self._vllm_config)))
        if stored is None or stored.config != self._config:
            raise ValueError(
                f"the `{CONFIG_KEY}` block next to the stored prefix of {model_config.model} differs from the one in "
                "the config vLLM loaded (a separate --hf-config-path?); both must describe the same prefix."
            )
        rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        heads = kv_head_slice(self._config.num_key_value_heads, rank, size)
        seen: dict[int, str] = {}
        for name, cache in kv_caches.items():
            if not isinstance(cache, torch.Tensor) or cache.dtype not in _FLOAT_CACHE_DTYPES:
                raise ValueError(f"IntactKV serving needs unquantized attention KV caches; {name} has another kind")
            layer = layer_index_of(name)
            if layer >= self._config.num_layers:
                raise ValueError(
                    f"KV cache layer {name} is beyond the {self._config.num_layers} layers the stored prefix covers "
                    "(a speculative-decoding draft model?); serve this checkpoint without a draft model."
                )
            if cache.data_ptr() in seen:
                raise ValueError(f"{seen[cache.data_ptr()]} and {name} share one KV cache; IntactKV cannot fill both")
            seen[cache.data_ptr()] = name
            packed = pack_layer(stored.keys[layer], stored.values[layer], heads)
            packed = packed.to(device=cache.device, dtype=cache.dtype)
            check_cache_layout(cache, packed)
            self._layers.append((cache, packed))
        kernel_block_sizes = {cache.shape[2] for cache, _ in self._layers}
        if len(kernel_block_sizes) != 1:
            raise ValueError(f"attention layers use different KV block sizes {sorted(kernel_block_sizes)}")
        (self._kernel_block_size,) = kernel_block_sizes
        logger.info(
            f"IntactKV: {len(self._layers)} layers of a {len(self._prefix)}-token prefix from {stored.source}, "
            f"KV heads {heads.start}..{heads.stop - 1} on tensor-parallel rank {rank}/{size}"
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, IntactKVConnectorMetadata)
        if not metadata.loads:
            return
        slots = slot_indices(metadata.loads, self._block_size, self._kernel_block_size)
        slots = slots.to(self._layers[0][0].device)
        for cache, packed in self._layers:
            write_prefix(cache, packed, slots)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: :meth:`start_load_kv` writes on the forward pass's stream, before it."""

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """IntactKV only loads."""

    def wait_for_save(self) -> None:
        """IntactKV only loads."""


def _needs_every_prompt_position(request: Request) -> bool:
    """Prompt logprobs and pooling read outputs at every prompt position, which loaded positions lack."""
    sampling = request.sampling_params
    return request.pooling_params is not None or (sampling is not None and sampling.prompt_logprobs is not None)
