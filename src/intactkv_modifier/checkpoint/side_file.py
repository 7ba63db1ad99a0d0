"""The side file that holds a checkpoint's prefix K/V, outside every weight file.

Weight loaders treat each top-level ``*.safetensors`` tensor as a parameter of
the model, and vLLM's rejects any it has no module for. So the prefix K/V live
one level down, in :data:`SIDE_FILE_PATH`, where no such glob looks.

The file is a plain safetensors file whose metadata repeats the block's
tensor-defining fields (:data:`~intactkv_modifier.config.TENSOR_FIELDS`); its
sha256 goes into the block. Reading checks the header against the block before
any tensor is materialised, so a wrong or hostile file costs no more than its
header, then the digest, then the tensors' values. Plain torch and safetensors:
the serving side runs inside vLLM's processes.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load, save

from intactkv_modifier.config import CONFIG_KEY, KEY_BUFFER, VALUE_BUFFER, IntactKVConfig

__all__ = [
    "SIDE_FILE_PATH",
    "parse_tensor_name",
    "read_side_file",
    "serialize_side_file",
    "sha256_of",
    "tensor_name",
]

#: Where the prefix K/V live, relative to the checkpoint folder.
SIDE_FILE_PATH = "intactkv/prefix_kv.safetensors"
#: The safetensors metadata key under which the side file repeats the block's tensor fields.
METADATA_KEY = "intactkv_tensor_fields"
#: What every refusal tells the user to do.
REMEDY = (
    f"Re-export the checkpoint with intactkv-modifier (save_pretrained writes {SIDE_FILE_PATH} and the block "
    f"together), or remove `{CONFIG_KEY}` from config.json to use the model without IntactKV."
)

# Side-file names are ``layers.{i}.self_attn.intact_key``; checkpoints written before
# the side file existed hold the same tensors in their weight files, under the
# model's own module path in front (``model.layers.{i}.self_attn.intact_key``).
_TENSOR_NAME = re.compile(rf"(?:^|\.)layers\.(\d+)\.self_attn\.({KEY_BUFFER}|{VALUE_BUFFER})$")
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_HEADER_LENGTH = struct.Struct("<Q")


def tensor_name(layer: int, kind: str) -> str:
    """The side-file name of layer ``layer``'s ``kind``, free of the model's module path."""
    if kind not in (KEY_BUFFER, VALUE_BUFFER):
        raise ValueError(f"IntactKV stores `{KEY_BUFFER}` and `{VALUE_BUFFER}` tensors, not `{kind}`")
    return f"layers.{layer}.self_attn.{kind}"


def parse_tensor_name(name: str) -> tuple[int, str] | None:
    """``(layer, kind)`` of a prefix tensor named in the side file or in an older checkpoint's weights, else None."""
    match = _TENSOR_NAME.search(name)
    return None if match is None else (int(match.group(1)), match.group(2))


def serialize_side_file(config: IntactKVConfig, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> bytes:
    """The side file's bytes: CPU copies in the block's dtype, contiguous, with the block's tensor fields."""
    if len(keys) != config.num_layers or len(values) != config.num_layers:
        raise ValueError(
            f"prefix KV has {len(keys)} key and {len(values)} value layers, the block declares {config.num_layers}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for layer, (key, value) in enumerate(zip(keys, values)):
        for kind, tensor in ((KEY_BUFFER, key), (VALUE_BUFFER, value)):
            if tuple(tensor.shape) != config.buffer_shape:
                raise ValueError(f"{kind} of layer {layer} is {tuple(tensor.shape)}, expected {config.buffer_shape}")
            tensors[tensor_name(layer, kind)] = tensor.detach().to(
                device="cpu", dtype=config.torch_dtype, memory_format=torch.contiguous_format, copy=True
            )
    # One metadata entry only: safetensors writes several in hash-map order, and the same tensors must give
    # the same bytes (and digest) on every save, or re-saving an unchanged model would not reproduce the block.
    return save(tensors, metadata={METADATA_KEY: json.dumps(config.tensor_fields(), sort_keys=True)})


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_side_file(path: Path, config: IntactKVConfig) -> dict[tuple[int, str], torch.Tensor]:
    """The tensors of the side file at ``path``, by ``(layer, kind)``, after checking them against ``config``.

    Order of checks: size and header (names, dtypes, shapes, offsets) before any
    tensor is read; then, for a version 2 block, the digest and the repeated
    tensor fields; then the values (finite).
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(_HEADER_LENGTH.size)
        (header_length,) = _HEADER_LENGTH.unpack(prefix) if len(prefix) == _HEADER_LENGTH.size else (size,)
        if _HEADER_LENGTH.size + header_length > size:
            raise ValueError(f"{path} is {size} bytes, too short for its safetensors header (truncated?). {REMEDY}")
        raw_header = handle.read(header_length)
        header = _parse_header(raw_header, path)
        _check_header(header, config, path)
        expected = _HEADER_LENGTH.size + header_length + 2 * config.num_layers * _nbytes(config)
        if size != expected:
            raise ValueError(
                f"{path} is {size} bytes, but its header and the block's {config.num_layers} layers of "
                f"{config.buffer_shape} {config.dtype} make {expected} (truncated?). {REMEDY}"
            )
        data = prefix + raw_header + handle.read()
    _check_seal(data, header.get("__metadata__") or {}, config, path)
    try:
        tensors = load(data)
    except Exception as error:  # safetensors' own error type is not part of its Python API
        raise ValueError(f"{path} is not a readable safetensors file ({error}). {REMEDY}") from error
    return {parse_tensor_name(name): tensor for name, tensor in tensors.items()}  # type: ignore[misc]


def _nbytes(config: IntactKVConfig) -> int:
    heads, length, head_dim = config.buffer_shape
    return heads * length * head_dim * config.torch_dtype.itemsize


def _parse_header(raw: bytes, path: Path) -> dict:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} has no readable safetensors header ({error}). {REMEDY}") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path} has no readable safetensors header. {REMEDY}")
    return header


def _check_header(header: dict, config: IntactKVConfig, path: Path) -> None:
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    expected = {tensor_name(layer, kind) for layer in range(config.num_layers) for kind in (KEY_BUFFER, VALUE_BUFFER)}
    if missing := sorted(expected - entries.keys()):
        first = parse_tensor_name(missing[0])
        assert first is not None
        raise ValueError(f"{path} lacks the IntactKV tensor `{first[1]}` of layer {first[0]}. {REMEDY}")
    if extra := sorted(entries.keys() - expected):
        raise ValueError(
            f"{path} holds tensors {extra[:4]} beyond the {config.num_layers} layers its config block declares; "
            f"the prefix K/V do not belong to this config. {REMEDY}"
        )
    dtype = _SAFETENSORS_DTYPES[config.torch_dtype]
    for name in sorted(expected):
        entry = entries[name]
        shape, stored = tuple(entry.get("shape", ())), entry.get("dtype")
        if shape != config.buffer_shape or stored != dtype:
            layer, kind = parse_tensor_name(name)  # type: ignore[misc]
            raise ValueError(
                f"IntactKV tensor `{kind}` of layer {layer} in {path} is {shape} {stored}, but the config block "
                f"declares {config.buffer_shape} {dtype} ({config.prefix_length} prefix tokens); the prefix K/V "
                f"do not match their config. {REMEDY}"
            )


def _check_seal(data: bytes, metadata: dict, config: IntactKVConfig, path: Path) -> None:
    """A version 2 block names the exact bytes it was saved with; a version 1 block cannot (read as before)."""
    if config.format_version == 1:
        if METADATA_KEY in metadata:
            raise ValueError(
                f"{path} was written with a version 2 block, but `{CONFIG_KEY}` says format_version 1, which "
                f"would skip its digest check (config.json edited?). {REMEDY}"
            )
        return
    if config.side_file_sha256 is None:
        raise ValueError(
            f"{path.parent.parent}: `{CONFIG_KEY}` has no side_file_sha256, so the save that wrote it did not finish "
            f"(interrupted or failed); its {SIDE_FILE_PATH} may be stale. Save the model again. {REMEDY}"
        )
    digest = sha256_of(data)
    if digest != config.side_file_sha256:
        raise ValueError(
            f"{path} has sha256 {digest[:12]}..., but `{CONFIG_KEY}` was saved with {config.side_file_sha256[:12]}...: "
            f"the side file is not the one saved with this config (copied from another checkpoint, corrupted, or "
            f"left by an interrupted save). {REMEDY}"
        )
    stored_fields = metadata.get(METADATA_KEY)
    if stored_fields is None or json.loads(stored_fields) != config.tensor_fields():
        raise ValueError(
            f"{path} was saved for {stored_fields}, but `{CONFIG_KEY}` now says {config.tensor_fields()} "
            f"(config.json edited after saving?). {REMEDY}"
        )
