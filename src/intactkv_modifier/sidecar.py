"""The side file that holds a checkpoint's prefix K/V, outside every weight file.

Weight loaders treat each top-level ``*.safetensors`` tensor as a parameter of
the model, and vLLM's rejects any it has no module for. So the prefix K/V live
one level down, in :data:`SIDECAR_PATH`, where no such glob looks. Saving
(:mod:`~intactkv_modifier.storage`) and reading
(:mod:`~intactkv_modifier.serving.checkpoint`) both name the tensors through this
module, so writer and reader cannot drift apart. It imports neither transformers
nor llm-compressor, because the serving side runs inside vLLM's processes.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from intactkv_modifier.config import KEY_BUFFER, VALUE_BUFFER

__all__ = ["SIDECAR_PATH", "parse_tensor_name", "tensor_name", "write_sidecar"]

#: Where the prefix K/V live, relative to the checkpoint folder: one level down,
#: so no ``*.safetensors`` glob over the folder (vLLM's, transformers') sees them.
SIDECAR_PATH = "intactkv/prefix_kv.safetensors"

# Side-file names are ``layers.{i}.self_attn.intact_key``; checkpoints written before
# the side file existed hold the same tensors in their weight files, under the
# model's own module path in front (``model.layers.{i}.self_attn.intact_key``).
_TENSOR_NAME = re.compile(rf"(?:^|\.)layers\.(\d+)\.self_attn\.({KEY_BUFFER}|{VALUE_BUFFER})$")


def tensor_name(layer: int, kind: str) -> str:
    """The side-file name of layer ``layer``'s ``kind`` (:data:`KEY_BUFFER` or :data:`VALUE_BUFFER`).

    Free of the model's module path, so the side file reads the same for every architecture.
    """
    if kind not in (KEY_BUFFER, VALUE_BUFFER):
        raise ValueError(f"IntactKV stores `{KEY_BUFFER}` and `{VALUE_BUFFER}` tensors, not `{kind}`")
    return f"layers.{layer}.self_attn.{kind}"


def parse_tensor_name(name: str) -> tuple[int, str] | None:
    """``(layer, kind)`` of a prefix tensor named in the side file or in an older checkpoint's weights, else None."""
    match = _TENSOR_NAME.search(name)
    return None if match is None else (int(match.group(1)), match.group(2))


def write_sidecar(
    checkpoint_dir: str | os.PathLike[str],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    dtype: torch.dtype,
) -> Path:
    """Write the per-layer K/V as :data:`SIDECAR_PATH` of ``checkpoint_dir``, atomically.

    The file is written next to its final place and renamed over it, so a crash
    leaves the previous side file (or none), never a truncated one that a loader
    would trust. Tensors go to the CPU, contiguous and in ``dtype`` (the config
    block's), as safetensors and the block's contract require.
    """
    if len(keys) != len(values):
        raise ValueError(f"prefix KV has {len(keys)} key layers but {len(values)} value layers")
    tensors: dict[str, torch.Tensor] = {}
    for layer, (key, value) in enumerate(zip(keys, values)):
        tensors[tensor_name(layer, KEY_BUFFER)] = _stored(key, dtype)
        tensors[tensor_name(layer, VALUE_BUFFER)] = _stored(value, dtype)
    path = Path(checkpoint_dir) / SIDECAR_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={"format": "pt"})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A private CPU copy: safetensors refuses tensors that share memory (views of one cache)."""
    return tensor.detach().to(device="cpu", dtype=dtype, memory_format=torch.contiguous_format, copy=True)
