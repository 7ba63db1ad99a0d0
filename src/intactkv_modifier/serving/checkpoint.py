"""Reading a checkpoint's IntactKV block and prefix tensors straight from its folder.

A server gets a folder (vLLM's model path), not a transformers model, so this
reads ``config.json`` and safetensors directly. It needs neither vLLM nor
transformers nor llm-compressor, because it runs inside vLLM's processes, whose
pinned compressed-tensors differs from the one llm-compressor needs.

The prefix tensors are looked for first in the side file :data:`SIDECAR_PATH`,
which vLLM's weight loader never opens (it globs ``*.safetensors`` in the
folder's top level only), and otherwise in the model's own weight files, where
checkpoints written before that file existed keep them. vLLM refuses the latter
(see :func:`prefix_tensors_in_weight_files`), so serving needs the side file.
Loading with transformers (:mod:`intactkv_modifier.loading`) reads through
:func:`read_prefix_tensors` too, so both accept and reject the same folders.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from intactkv_modifier.config import CONFIG_KEY, KEY_BUFFER, VALUE_BUFFER, IntactKVConfig
from intactkv_modifier.sidecar import SIDECAR_PATH, parse_tensor_name

__all__ = [
    "SIDECAR_PATH",
    "StoredPrefix",
    "prefix_tensors_in_weight_files",
    "read_config_block",
    "read_prefix",
    "read_prefix_tensors",
]

_INDEX_FILE = "model.safetensors.index.json"
#: What every refusal below tells the user to do.
_REMEDY = (
    f"Re-export the checkpoint with intactkv-modifier (it writes {SIDECAR_PATH}), or remove `{CONFIG_KEY}` "
    "from config.json to use the model without IntactKV."
)


@dataclass(frozen=True)
class StoredPrefix:
    """The config block and its per-layer K/V, each ``[num_key_value_heads, prefix_length, head_dim]``.

    ``source`` is the side file when the tensors came from it, else the checkpoint folder.
    """

    config: IntactKVConfig
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    source: Path


def read_config_block(checkpoint_dir: str | os.PathLike[str]) -> IntactKVConfig | None:
    """The checkpoint's ``intactkv_config``, or ``None`` when its config.json has none."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no config.json; it is not a transformers checkpoint folder")
    block = json.loads(path.read_text()).get(CONFIG_KEY)
    return None if block is None else IntactKVConfig.from_config_value(block)


def prefix_tensors_in_weight_files(checkpoint_dir: str | os.PathLike[str]) -> list[str]:
    """Weight files vLLM would load that hold prefix tensors; vLLM rejects such a checkpoint.

    vLLM's ``AutoWeightsLoader`` raises ``ValueError: There is no module or
    parameter named '...self_attn.intact_key'`` for any tensor its model lacks.
    """
    holding = []
    for path in _weight_files(Path(checkpoint_dir)):
        with safe_open(str(path), framework="pt") as handle:
            if any(parse_tensor_name(name) is not None for name in handle.keys()):  # noqa: SIM118 (not a dict)
                holding.append(path.name)
    return holding


def read_prefix(checkpoint_dir: str | os.PathLike[str]) -> StoredPrefix | None:
    """The checkpoint's prefix K/V, checked against its config block; ``None`` without a block."""
    config = read_config_block(checkpoint_dir)
    return None if config is None else read_prefix_tensors(checkpoint_dir, config)


def read_prefix_tensors(checkpoint_dir: str | os.PathLike[str], config: IntactKVConfig) -> StoredPrefix:
    """The prefix K/V in ``checkpoint_dir``, checked against ``config``: every layer, shape, dtype, finite.

    ``config`` is passed rather than read so that a loader checks the tensors
    against the block its model was actually built with.
    """
    directory = Path(checkpoint_dir)
    sidecar = directory / SIDECAR_PATH
    source, files = (sidecar, [sidecar]) if sidecar.is_file() else (directory, _weight_files(directory))
    found: dict[tuple[int, str], torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                key = parse_tensor_name(name)
                if key is None:
                    continue
                if key in found:
                    raise ValueError(f"IntactKV tensor {name} appears twice in {directory}")
                found[key] = handle.get_tensor(name)
    if not found:
        raise ValueError(
            f"{directory}: its config announces IntactKV ({CONFIG_KEY}) but neither {SIDECAR_PATH} nor the weight "
            f"files hold its prefix tensors (copied without the {Path(SIDECAR_PATH).parent}/ folder?). {_REMEDY}"
        )
    keys = tuple(_checked(found, config, layer, KEY_BUFFER, directory) for layer in range(config.num_layers))
    values = tuple(_checked(found, config, layer, VALUE_BUFFER, directory) for layer in range(config.num_layers))
    extra = sorted(layer for layer, _ in found if layer >= config.num_layers)
    if extra:
        raise ValueError(
            f"{directory} holds IntactKV tensors for layers {extra}, but its config block declares "
            f"{config.num_layers} layers; the prefix K/V do not belong to this config. {_REMEDY}"
        )
    return StoredPrefix(config=config, keys=keys, values=values, source=source)


def _checked(
    found: dict[tuple[int, str], torch.Tensor], config: IntactKVConfig, layer: int, kind: str, directory: Path
) -> torch.Tensor:
    tensor = found.get((layer, kind))
    if tensor is None:
        raise ValueError(f"{directory} lacks the IntactKV tensor `{kind}` of layer {layer}. {_REMEDY}")
    if tuple(tensor.shape) != config.buffer_shape or tensor.dtype != config.torch_dtype:
        raise ValueError(
            f"IntactKV tensor `{kind}` of layer {layer} in {directory} is {tuple(tensor.shape)} {tensor.dtype}, but "
            f"the config block declares {config.buffer_shape} {config.torch_dtype} "
            f"({config.prefix_length} prefix tokens); the prefix K/V do not match their config. {_REMEDY}"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"IntactKV tensor `{kind}` of layer {layer} in {directory} holds non-finite values. {_REMEDY}")
    return tensor


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files vLLM loads from a local folder: top level only, and only those in the index if any."""
    files = sorted(directory.glob("*.safetensors"))
    index = directory / _INDEX_FILE
    if index.is_file():
        indexed = set(json.loads(index.read_text())["weight_map"].values())
        files = [path for path in files if path.name in indexed]
    return files
