"""vLLM KV connector that puts the checkpoint's stored prefix K/V into vLLM's paged cache.

vLLM loads this module by path (``kv_connector_module_path``) once the plugin
(:mod:`intactkv_modifier.serving.vllm_plugin`) has configured it; nothing else
imports it, so it may import vLLM at the top.

Two ways in, both through the attention backend's own ``do_kv_cache_update``
(the op vLLM itself stores every computed token with), so the bytes land in
whatever arrangement and format that backend keeps:

- **Loaded** (ordinary requests): the prefix positions vLLM does not already
  hold are reported as externally computed, so vLLM allocates their slots and
  skips computing them; before the step's forward pass they are written.
- **Overwritten** (requests that need an output at every prompt position:
  prompt log-probabilities, pooling): vLLM computes the whole prompt; right
  before each attention layer runs (after vLLM stored the step's K/V, before
  any query reads them) the prefix slots are overwritten with the stored K/V,
  so every position, prefix ones included, attends to the intact prefix.
  Under TurboQuant the first prefill chunk of a request attends to the step's
  own K/V, not to the cache, so this path cannot reach it: the plugin refuses
  such requests (:func:`~intactkv_modifier.serving.vllm_plugin.whole_prompt_refusal`)
  and the scheduler side stops rather than serve one plain.

vLLM's hybrid KV-cache manager stays on (the connector implements
``SupportsHMA``): a sliding-window model's layers fall into KV-cache groups,
each with its own blocks per request, and layers of different groups share one
cache tensor; each layer is written through its own group's blocks, and
positions a sliding-window group no longer holds (vLLM's null block) are
skipped, since no later query of such a layer reads them.

Every layer is proven at start: the whole prefix is written into free blocks
through the backend's store, read back with the backend's arrangement
(:mod:`~intactkv_modifier.serving.cache_layouts`) and compared; the first real
write of each worker is checked the same way. A backend, arrangement or cache
format that cannot be proven stops the engine with the reason.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.config import get_layers_from_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.model_executor.layers.attention import Attention

from intactkv_modifier.checkpoint import StoredPrefix, checkpoint_folder, read_prefix
from intactkv_modifier.config import CONFIG_KEY, IntactKVConfig
from intactkv_modifier.serving.cache_layouts import UnverifiableCacheError, layout_for
from intactkv_modifier.serving.layer_prefix import (
    FP8_CACHE_DTYPES,
    LayerPrefix,
    PrefixWriter,
    attention_store,
    cache_codes,
)
from intactkv_modifier.serving.log import logger
from intactkv_modifier.serving.matching import loadable_prefix_end, prefix_positions_to_load, starts_with_prefix
from intactkv_modifier.serving.paged import (
    NO_BLOCK,
    PrefixLoad,
    SlotIndices,
    kv_head_slice,
    layer_index_of,
    slot_indices,
)
from intactkv_modifier.serving.turboquant import TURBOQUANT_BACKEND, turboquant_prefix
from intactkv_modifier.serving.vllm_plugin import (
    ALLOW_PLAIN_ENV,
    computes_whole_prompt,
    first_chunk_reads_step_kv,
    hub_access,
    whole_prompt_refusal,
)

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

_REMEDY = (
    f"Serve it with --kv-cache-dtype auto on a supported attention backend, or set {ALLOW_PLAIN_ENV}=1 to serve "
    "it without IntactKV (VLLM_PLUGINS='' turns the plugin off)."
)


@dataclass
class IntactKVConnectorMetadata(KVConnectorMetadata):
    """One scheduler step's prefix writes, sent to every worker."""

    #: Positions vLLM does not compute: written before the forward pass.
    loads: list[PrefixLoad] = field(default_factory=list)
    #: Positions vLLM computes in this step: overwritten before each layer's attention.
    overwrites: list[PrefixLoad] = field(default_factory=list)


class IntactKVConnector(KVConnectorBase_V1, SupportsHMA):
    """Writes the stored pivot-prefix K/V into vLLM's paged cache; saves nothing."""

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
        #: per KV-cache group: the scheduler's block size
        self._block_sizes: list[int] = [group.kv_cache_spec.block_size for group in groups]
        self._group_of: dict[str, int] = {
            name: index for index, group in enumerate(groups) for name in group.layer_names
        }
        self._cache_dtype = str(vllm_config.cache_config.cache_dtype)
        # scheduler side
        self._pending: list[PrefixLoad] = []
        # request id -> its blocks per KV-cache group, for requests vLLM computes whole
        self._whole_prompt: dict[str, list[list[int]]] = {}
        self._block_pool: BlockPool | None = None
        # worker side
        self._layers: dict[str, PrefixWriter] = {}
        self._kernel_block_size = 0
        self._first_write_checked = False
        self._overwrites: dict[int, SlotIndices] | None = None
        self._overwritten: set[str] = set()

    # ------------------------------------------------------------------ scheduler side

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        self._block_pool = gpu_block_pool

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        if computes_whole_prompt(request.sampling_params, request.pooling_params):
            if first_chunk_reads_step_kv(self._cache_dtype) and starts_with_prefix(
                request.prompt_token_ids, self._prefix
            ):  # the plugin refuses these requests; one that got past it must not be served plain
                raise RuntimeError(whole_prompt_refusal(self._cache_dtype))
            return 0, False
        window = prefix_positions_to_load(
            request.prompt_token_ids, self._prefix, num_computed_tokens, request.num_tokens
        )
        return len(window), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens:
            end = loadable_prefix_end(len(self._prefix), request.num_tokens)
            for group, group_blocks in enumerate(blocks.blocks):
                block_ids = tuple(NO_BLOCK if block.is_null else block.block_id for block in group_blocks)
                self._pending.append(PrefixLoad(block_ids, end - num_external_tokens, end, group))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> IntactKVConnectorMetadata:
        metadata = IntactKVConnectorMetadata(loads=self._pending, overwrites=self._overwrites_of(scheduler_output))
        self._pending = []
        return metadata

    def _overwrites_of(self, scheduler_output: SchedulerOutput) -> list[PrefixLoad]:
        """Prefix positions that requests computing their whole prompt compute in this step."""
        computed: dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            if computes_whole_prompt(new.sampling_params, new.pooling_params) and starts_with_prefix(
                new.prompt_token_ids, self._prefix
            ):
                self._whole_prompt[new.req_id] = [list(ids) for ids in new.block_ids]
                computed[new.req_id] = new.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            if req_id not in self._whole_prompt:
                continue
            if (new_blocks := cached.new_block_ids[index]) is not None:
                if req_id in cached.resumed_req_ids:
                    self._whole_prompt[req_id] = [list(ids) for ids in new_blocks]
                else:
                    for held, ids in zip(self._whole_prompt[req_id], new_blocks, strict=True):
                        held.extend(ids)
            computed[req_id] = cached.num_computed_tokens[index]
        overwrites = []
        for req_id, start in computed.items():
            end = min(len(self._prefix), start + scheduler_output.num_scheduled_tokens[req_id])
            if start < end:  # positions computed in this step: every group holds a block for them
                overwrites.extend(
                    PrefixLoad(tuple(ids), start, end, group) for group, ids in enumerate(self._whole_prompt[req_id])
                )
        return overwrites

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._whole_prompt.pop(request.request_id, None)
        prompt = request.prompt_token_ids
        if prompt is not None and list(prompt) == list(self._prefix):
            # The prompt was the bare prefix: its last token had to be computed, not loaded,
            # so the block holding it must not serve later requests from the prefix cache.
            last = len(self._prefix) - 1
            self._forget_cached(
                {
                    ids[last // size]
                    for ids, size in zip(block_ids, self._block_sizes, strict=True)
                    if len(ids) > last // size
                }
            )
        return False, None

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's call when its hybrid KV-cache manager is off (one KV-cache group)."""
        return self.request_finished_all_groups(request, (block_ids,))

    def _forget_cached(self, block_ids: set[int]) -> None:
        if self._block_pool is None:
            logger.warning("IntactKV: vLLM gave the connector no block pool; prefix-cache entries may mix K/V kinds")
            return
        self._block_pool.evict_blocks(block_ids - {self._block_pool.null_block.block_id})

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
        attention = get_layers_from_vllm_config(self._vllm_config, Attention, list(kv_caches))
        owners: dict[tuple[int, int], str] = {}  # layers of different KV-cache groups share tensors, not blocks
        for name, cache in kv_caches.items():
            if name not in self._group_of:
                raise UnverifiableCacheError(f"KV cache {name} is in no KV-cache group vLLM configured. {_REMEDY}")
            owner = (cache.data_ptr(), self._group_of[name])
            if owner in owners:
                raise ValueError(f"{owners[owner]} and {name} share one KV cache; IntactKV cannot fill both")
            owners[owner] = name
            if name not in attention:
                raise UnverifiableCacheError(f"KV cache {name} belongs to no attention layer IntactKV knows. {_REMEDY}")
            self._layers[name] = self._layer_prefix(name, cache, attention[name], stored, heads)
        kernel_block_sizes = {layer.cache.shape[2] for layer in self._layers.values()}
        if len(kernel_block_sizes) != 1:
            raise ValueError(f"attention layers use different KV block sizes {sorted(kernel_block_sizes)}")
        (self._kernel_block_size,) = kernel_block_sizes
        self._prove_every_layer()
        layouts = Counter(layer.layout.name for layer in self._layers.values())  # TurboQuant keeps 4 layers plain
        logger.info(
            "IntactKV: %d layers of a %d-token prefix from %s, KV heads %d..%d on tensor-parallel rank %d/%d, "
            "%d KV-cache group(s), written through the attention backend's own store (%s) and read back exactly",
            len(self._layers), len(self._prefix), stored.source, heads.start, heads.stop - 1, rank, size,
            len(self._block_sizes), "; ".join(f"{count} layers: {name}" for name, count in layouts.items()),
        )  # fmt: skip

    def _layer_prefix(
        self, name: str, cache: torch.Tensor, layer: Attention, stored: StoredPrefix, heads: slice
    ) -> PrefixWriter:
        """The layer's prefix rows in the model dtype, the store vLLM uses for the layer, and its cache's reader."""
        index = layer_index_of(name)
        if index >= self._config.num_layers:
            raise ValueError(
                f"KV cache layer {name} is beyond the {self._config.num_layers} layers the stored prefix covers "
                "(a speculative-decoding draft model?); serve this checkpoint without a draft model."
            )
        backend = layer.attn_backend
        if backend.forward_includes_kv_cache_update or not hasattr(layer.impl, "do_kv_cache_update"):
            raise UnverifiableCacheError(
                f"attention backend {backend.get_name()} of {name} stores K/V inside its attention call, so the "
                f"stored prefix cannot be written through vLLM's own store before attention reads it. {_REMEDY}"
            )
        model_dtype = self._vllm_config.model_config.dtype
        keys, values = (
            rows[index][heads].transpose(0, 1).to(device=cache.device, dtype=model_dtype).contiguous()
            for rows in (stored.keys, stored.values)
        )
        if backend.get_name() == TURBOQUANT_BACKEND:
            return turboquant_prefix(name, cache, layer, keys, values)
        layout = layout_for(backend.get_name(), getattr(layer, "isa", None))
        code_dtype = FP8_CACHE_DTYPES.get(layer.kv_cache_dtype, cache.dtype)
        key_scale, value_scale = _scale(layer, "_k_scale", name), _scale(layer, "_v_scale", name)

        return LayerPrefix(
            name=name,
            cache=cache,
            keys=keys,
            values=values,
            expected_keys=cache_codes(keys, code_dtype, key_scale),
            expected_values=cache_codes(values, code_dtype, value_scale),
            store=attention_store(layer, cache),
            layout=layout,
        )

    def _prove_every_layer(self) -> None:
        """Write the whole prefix into the first free blocks of every layer, read it back, restore the blocks."""
        size = self._kernel_block_size
        blocks = tuple(range(-(-len(self._prefix) // size)))
        slots = slot_indices([PrefixLoad(blocks, 0, len(self._prefix))], size, size)
        for layer in self._layers.values():
            try:
                layer.self_test(slots.to(layer.cache.device))
            except UnverifiableCacheError as error:
                raise UnverifiableCacheError(f"{error}. {_REMEDY}") from error

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Called before every forward pass (before or after :meth:`start_load_kv`, by vLLM version)."""
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, IntactKVConnectorMetadata)
        self._overwritten.clear()
        overwrites = connector_metadata.overwrites
        self._overwrites = self._slots_per_group(overwrites) if overwrites else None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Write this step's loaded prefix positions; vLLM calls it before the forward pass when a load is due."""
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, IntactKVConnectorMetadata)
        if not metadata.loads:
            return
        slots = self._slots_per_group(metadata.loads)
        for name, layer in self._layers.items():
            layer.write(slots[self._group_of[name]])
        if not self._first_write_checked:
            for name, layer in self._layers.items():
                layer.verify(slots[self._group_of[name]])
            self._first_write_checked = True

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Overwrite the prefix positions this step computed, after vLLM stored them and before attention reads."""
        if self._overwrites is not None and layer_name in self._layers:
            self._layers[layer_name].write(self._overwrites[self._group_of[layer_name]])
            self._overwritten.add(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """IntactKV only writes the prefix."""

    def wait_for_save(self) -> None:
        """After the forward pass: every layer must have had its computed prefix positions overwritten.

        vLLM calls :meth:`wait_for_layer_load` from its attention op, which a
        replayed full CUDA graph skips; a step like that (a one-token prefill
        chunk in a decode-only batch) fails here rather than return outputs
        computed without the intact prefix.
        """
        if self._overwrites is not None and self._overwritten != set(self._layers):
            missing = sorted(set(self._layers) - self._overwritten)
            raise RuntimeError(
                f"IntactKV: vLLM ran the attention of {len(missing)} layers ({missing[0]}, ...) without calling the "
                "connector (a replayed full CUDA graph?), so prefix positions computed in this step hold the "
                "quantized model's K/V. Serve with --compilation-config '{\"cudagraph_mode\": \"PIECEWISE\"}' or "
                "--enforce-eager."
            )
        self._overwrites = None

    def _slots_per_group(self, loads: list[PrefixLoad]) -> dict[int, SlotIndices]:
        """Every KV-cache group's slots for ``loads`` (empty for a group without any)."""
        device = next(iter(self._layers.values())).cache.device
        by_group: dict[int, list[PrefixLoad]] = {group: [] for group in range(len(self._block_sizes))}
        for load in loads:
            by_group[load.group].append(load)
        return {
            group: slot_indices(by_group[group], size, self._kernel_block_size).to(device)
            for group, size in enumerate(self._block_sizes)
        }


def _scale(layer: Attention, attribute: str, name: str) -> float:
    """The layer's per-tensor fp8 scale (1.0 for an unquantized cache); per-head scales are not verified here."""
    scale = getattr(layer, attribute, None)
    if scale is None:
        return 1.0
    if scale.numel() != 1:
        raise UnverifiableCacheError(
            f"{name} quantizes its KV cache with {scale.numel()} scales (one per head); IntactKV verifies only a "
            f"per-tensor scale. {_REMEDY}"
        )
    value = float(scale.item())
    if not math.isfinite(value) or value <= 0:
        raise UnverifiableCacheError(f"{name} has KV-cache scale {value}. {_REMEDY}")
    return value
