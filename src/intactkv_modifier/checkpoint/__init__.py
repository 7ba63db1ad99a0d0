"""IntactKV's part of a checkpoint, in one place: what is written, in which order, and what a reader accepts.

- :mod:`~intactkv_modifier.config`: the versioned ``intactkv_config`` block in config.json;
- :mod:`.side_file`: ``intactkv/prefix_kv.safetensors``, its tensor names, bytes and checks;
- :mod:`.folder`: the write order of a save and the single reader both loaders use;
- :mod:`.card`: the README.md a save writes, saying that the prefix needs the package;
- :mod:`.files`: atomic, durable, umask-respecting writes;
- :mod:`.source`: a folder or a hub snapshot, with the caller's credentials and revision.

Plain torch, safetensors and pydantic: vLLM's processes import it without llm-compressor or transformers.
"""

from intactkv_modifier.checkpoint.card import (
    CARD_FILE,
    NEEDS_PACKAGE,
    card_mentions_package,
    model_card,
    write_model_card,
)
from intactkv_modifier.checkpoint.folder import (
    StoredPrefix,
    forget_prefix,
    prefix_tensors_in_weight_files,
    read_config_block,
    read_prefix,
    read_prefix_tensors,
    seal_prefix,
)
from intactkv_modifier.checkpoint.side_file import SIDE_FILE_PATH, parse_tensor_name, tensor_name
from intactkv_modifier.checkpoint.source import HubAccess, checkpoint_folder

__all__ = [
    "CARD_FILE",
    "NEEDS_PACKAGE",
    "SIDE_FILE_PATH",
    "HubAccess",
    "StoredPrefix",
    "card_mentions_package",
    "checkpoint_folder",
    "forget_prefix",
    "model_card",
    "parse_tensor_name",
    "prefix_tensors_in_weight_files",
    "read_config_block",
    "read_prefix",
    "read_prefix_tensors",
    "seal_prefix",
    "tensor_name",
    "write_model_card",
]
