"""Serving IntactKV checkpoints with vLLM.

Split so that the logic is tested without vLLM and importing it never needs vLLM:

- :mod:`intactkv_modifier.checkpoint` (re-exported here), :mod:`.matching`,
  :mod:`.paged`: reading the block and the prefix tensors from a checkpoint
  folder, deciding which prefix positions a request gets, and placing per-layer ``[kv_heads, P, head_dim]`` tensors into
  vLLM's paged cache (tensor-parallel head split included). Plain torch.
- :mod:`.vllm_plugin`: the ``vllm.general_plugins`` entry point; imports vLLM
  only when vLLM calls it.
- :mod:`.vllm_connector`: the KV connector vLLM loads by module path; the one
  module that imports vLLM at the top, and only vLLM imports it.

docs/serving.md explains the choice of vLLM extension point.
"""

from intactkv_modifier.checkpoint import (
    SIDE_FILE_PATH,
    StoredPrefix,
    prefix_tensors_in_weight_files,
    read_config_block,
    read_prefix,
)
from intactkv_modifier.serving.matching import loadable_prefix_end, prefix_positions_to_load, starts_with_prefix
from intactkv_modifier.serving.paged import (
    PrefixLoad,
    SlotIndices,
    check_cache_layout,
    kv_head_slice,
    layer_index_of,
    pack_layer,
    slot_indices,
    write_prefix,
)

__all__ = [
    "SIDE_FILE_PATH",
    "PrefixLoad",
    "SlotIndices",
    "StoredPrefix",
    "check_cache_layout",
    "kv_head_slice",
    "layer_index_of",
    "loadable_prefix_end",
    "pack_layer",
    "prefix_positions_to_load",
    "prefix_tensors_in_weight_files",
    "read_config_block",
    "read_prefix",
    "slot_indices",
    "starts_with_prefix",
    "write_prefix",
]
