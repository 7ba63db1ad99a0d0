"""Reading and writing IntactKV's part of a checkpoint folder: the config block and the side file.

Both loaders, transformers' (:mod:`intactkv_modifier.loading`) and vLLM's
(:mod:`intactkv_modifier.serving`), read through :func:`read_prefix_tensors`, so
they accept and refuse the same folders; every save writes through
:func:`forget_prefix` and :func:`seal_prefix`.

Why this write order: a save first removes the old side file, then writes the
weights and config.json (whose block has no digest yet), then the new side file,
and last the block with the side file's sha256. A save stopped at any point
leaves either a folder without a side file or a block without a digest, and
both are refused on load; a folder only loads once every step is done. Before
the side file existed, checkpoints kept the tensors in their weight files; those
(and version 1 blocks, which have no digest) still load as they did.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from safetensors import safe_open

from intactkv_modifier.checkpoint.files import remove_durably, write_atomically
from intactkv_modifier.checkpoint.side_file import (
    REMEDY,
    SIDE_FILE_PATH,
    parse_tensor_name,
    read_side_file,
    serialize_side_file,
    sha256_of,
)
from intactkv_modifier.config import CONFIG_KEY, KEY_BUFFER, VALUE_BUFFER, IntactKVConfig

__all__ = [
    "StoredPrefix",
    "forget_prefix",
    "prefix_tensors_in_weight_files",
    "read_config_block",
    "read_prefix",
    "read_prefix_tensors",
    "seal_prefix",
]

_INDEX_FILE = "model.safetensors.index.json"
_CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class StoredPrefix:
    """The config block and its per-layer K/V, each ``[num_key_value_heads, prefix_length, head_dim]``.

    ``source`` is the side file when the tensors came from it, else the checkpoint folder.
    """

    config: IntactKVConfig
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    source: Path


# ---------------------------------------------------------------------------------------------- writing


def forget_prefix(directory: Path) -> None:
    """First step of a save into ``directory``: drop its side file, so no later crash can pair it with new weights."""
    remove_durably(directory / SIDE_FILE_PATH)


def seal_prefix(
    directory: Path, config: IntactKVConfig, keys: list[torch.Tensor], values: list[torch.Tensor]
) -> IntactKVConfig:
    """Last steps of a save, after the weights and config.json: the side file, then the block naming its digest."""
    data = serialize_side_file(config, keys, values)
    write_atomically(directory / SIDE_FILE_PATH, data)
    sealed = config.unsealed().model_copy(update={"side_file_sha256": sha256_of(data)})
    path = directory / _CONFIG_FILE
    document = json.loads(path.read_text())
    document[CONFIG_KEY] = sealed.to_config_value()
    write_atomically(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    return sealed


# ---------------------------------------------------------------------------------------------- reading


def read_config_block(checkpoint_dir: str | os.PathLike[str]) -> IntactKVConfig | None:
    """The checkpoint's ``intactkv_config``, or ``None`` when its config.json has none."""
    path = Path(checkpoint_dir) / _CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no config.json; it is not a transformers checkpoint folder")
    block = json.loads(path.read_text()).get(CONFIG_KEY)
    return None if block is None else IntactKVConfig.from_config_value(block)


def read_prefix(checkpoint_dir: str | os.PathLike[str]) -> StoredPrefix | None:
    """The checkpoint's prefix K/V, checked against its config block; ``None`` without a block."""
    config = read_config_block(checkpoint_dir)
    return None if config is None else read_prefix_tensors(checkpoint_dir, config)


def read_prefix_tensors(checkpoint_dir: str | os.PathLike[str], config: IntactKVConfig) -> StoredPrefix:
    """The prefix K/V in ``checkpoint_dir``, checked against ``config``: digest, every layer, shape, dtype, finite.

    ``config`` is passed rather than read so that a loader checks the tensors
    against the block its model was actually built with.
    """
    directory = Path(checkpoint_dir)
    side_file = directory / SIDE_FILE_PATH
    if side_file.is_file():
        found, source = read_side_file(side_file, config), side_file
    elif config.format_version == 1:
        found, source = _read_from_weight_files(directory, config), directory
    else:
        found, source = {}, directory
    if not found:
        raise ValueError(
            f"{directory}: its config announces IntactKV ({CONFIG_KEY}) but neither {SIDE_FILE_PATH} nor the weight "
            f"files hold its prefix tensors (copied without the {Path(SIDE_FILE_PATH).parent}/ folder, or a save "
            f"that did not finish?). {REMEDY}"
        )
    keys = tuple(_checked(found, config, layer, KEY_BUFFER, directory) for layer in range(config.num_layers))
    values = tuple(_checked(found, config, layer, VALUE_BUFFER, directory) for layer in range(config.num_layers))
    if source == directory:
        logger.warning(
            f"IntactKV: {directory} keeps its prefix K/V in its weight files (the layout before {SIDE_FILE_PATH}); "
            "they are applied, but vLLM refuses such a checkpoint: load it with transformers and save it again."
        )
    return StoredPrefix(config=config, keys=keys, values=values, source=source)


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


def _read_from_weight_files(directory: Path, config: IntactKVConfig) -> dict[tuple[int, str], torch.Tensor]:
    """The older layout: shapes and dtypes are checked on each tensor's header before it is read."""
    found: dict[tuple[int, str], torch.Tensor] = {}
    for path in _weight_files(directory):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                key = parse_tensor_name(name)
                if key is None:
                    continue
                if key in found:
                    raise ValueError(f"IntactKV tensor {name} appears twice in {directory}")
                if key[0] >= config.num_layers:
                    raise ValueError(
                        f"{directory} holds IntactKV tensors for layer {key[0]}, but its config block declares "
                        f"{config.num_layers} layers; the prefix K/V do not belong to this config. {REMEDY}"
                    )
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != config.buffer_shape:
                    raise ValueError(_mismatch(directory, key, f"{shape}", config))
                found[key] = handle.get_tensor(name)
    return found


def _mismatch(directory: Path, key: tuple[int, str], actual: str, config: IntactKVConfig) -> str:
    layer, kind = key
    return (
        f"IntactKV tensor `{kind}` of layer {layer} in {directory} is {actual}, but the config block declares "
        f"{config.buffer_shape} {config.torch_dtype} ({config.prefix_length} prefix tokens); the prefix K/V do not "
        f"match their config. {REMEDY}"
    )


def _checked(
    found: dict[tuple[int, str], torch.Tensor], config: IntactKVConfig, layer: int, kind: str, directory: Path
) -> torch.Tensor:
    tensor = found.get((layer, kind))
    if tensor is None:
        raise ValueError(f"{directory} lacks the IntactKV tensor `{kind}` of layer {layer}. {REMEDY}")
    if tuple(tensor.shape) != config.buffer_shape or tensor.dtype != config.torch_dtype:
        raise ValueError(_mismatch(directory, (layer, kind), f"{tuple(tensor.shape)} {tensor.dtype}", config))
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"IntactKV tensor `{kind}` of layer {layer} in {directory} holds non-finite values. {REMEDY}")
    return tensor


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files vLLM loads from a local folder: top level only, and only those in the index if any."""
    files = sorted(directory.glob("*.safetensors"))
    index = directory / _INDEX_FILE
    if index.is_file():
        indexed = set(json.loads(index.read_text())["weight_map"].values())
        files = [path for path in files if path.name in indexed]
    return files
