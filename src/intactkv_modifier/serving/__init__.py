"""Serving IntactKV checkpoints with vLLM.

Split so that the logic is tested without vLLM and importing it never needs vLLM:

- :mod:`intactkv_modifier.checkpoint` (re-exported here): the block and the prefix tensors of a checkpoint;
- :mod:`.matching`: which prefix positions a request gets;
- :mod:`.paged`: the cache slots of those positions, and the KV heads of a tensor-parallel rank;
- :mod:`.cache_layouts`: how each attention backend arranges its cache, read back slot by slot;
- :mod:`.layer_prefix`: one layer's prefix, written through vLLM's own store and proven by reading it back;
- :mod:`.turboquant`: the same for vLLM's TurboQuant caches, proven with vLLM's own store and decoder (imports
  vLLM; only the connector imports it);
- :mod:`.vllm_plugin`: the ``vllm.general_plugins`` entry point; imports vLLM only when vLLM calls it;
- :mod:`.vllm_connector`: the KV connector vLLM loads by module path; the one module that imports vLLM at
  the top, and only vLLM imports it.

docs/serving.md explains the choice of vLLM extension point.
"""

from intactkv_modifier.checkpoint import (
    SIDE_FILE_PATH,
    StoredPrefix,
    prefix_tensors_in_weight_files,
    read_config_block,
    read_prefix,
)
from intactkv_modifier.serving.cache_layouts import (
    CacheLayout,
    CpuAttentionLayout,
    KeysBesideValues,
    PackedSlots,
    UnverifiableCacheError,
    layout_for,
)
from intactkv_modifier.serving.layer_prefix import LayerPrefix, PrefixWriter, cache_codes
from intactkv_modifier.serving.matching import loadable_prefix_end, prefix_positions_to_load, starts_with_prefix
from intactkv_modifier.serving.paged import (
    NO_BLOCK,
    PrefixLoad,
    SlotIndices,
    kv_head_slice,
    layer_index_of,
    slot_indices,
)

__all__ = [
    "SIDE_FILE_PATH",
    "CacheLayout",
    "CpuAttentionLayout",
    "KeysBesideValues",
    "LayerPrefix",
    "PackedSlots",
    "NO_BLOCK",
    "PrefixLoad",
    "PrefixWriter",
    "SlotIndices",
    "StoredPrefix",
    "UnverifiableCacheError",
    "cache_codes",
    "kv_head_slice",
    "layer_index_of",
    "layout_for",
    "loadable_prefix_end",
    "prefix_positions_to_load",
    "prefix_tensors_in_weight_files",
    "read_config_block",
    "read_prefix",
    "slot_indices",
    "starts_with_prefix",
]
