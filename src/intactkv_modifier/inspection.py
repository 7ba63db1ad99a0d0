"""Checking a saved IntactKV checkpoint before it is shipped, without loading its weights.

Every check the loaders make (transformers' hook in
:mod:`~intactkv_modifier.loading` and the vLLM plugin's reader in
:mod:`~intactkv_modifier.checkpoint`) runs here on the folder alone, so
a checkpoint that would fail to load fails here first, with the loader's own
message. Each check is recorded, passed or not, so the report shows what was
verified, not only what went wrong. One check is for people rather than loaders:
whether the folder's README says that the prefix needs intactkv-modifier, since
without the package every loader takes the plain model silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import AutoConfig

from intactkv_modifier.architecture import kv_geometry
from intactkv_modifier.checkpoint import (
    CARD_FILE,
    NEEDS_PACKAGE,
    SIDE_FILE_PATH,
    StoredPrefix,
    card_mentions_package,
    prefix_tensors_in_weight_files,
    read_config_block,
    read_prefix_tensors,
    tensor_name,
)
from intactkv_modifier.config import CONFIG_KEY, KEY_BUFFER, VALUE_BUFFER, IntactKVConfig
from intactkv_modifier.kv_quant.settings import KVQuantSettings

__all__ = ["WHERE_IT_LOADS", "Check", "CheckpointInspection", "Outcome", "inspect_checkpoint"]

Outcome = Literal["ok", "warning", "error"]

#: Every verdict of a folder that loads says it: without the package nothing warns.
WHERE_IT_LOADS = (
    "in transformers and vLLM where intactkv-modifier is installed (without it, both load the plain quantized "
    "model, silently)"
)


@dataclass(frozen=True)
class Check:
    name: str
    outcome: Outcome
    detail: str


@dataclass
class CheckpointInspection:
    """The block, the side file's tensors (name -> shape, dtype) and every check made, in order."""

    path: Path
    block: dict[str, Any] | None = None
    tensors: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def loads(self) -> bool:
        """Whether transformers (and vLLM) would load it with its intact prefix."""
        return bool(self.checks) and all(check.outcome != "error" for check in self.checks)

    @property
    def verdict(self) -> str:
        errors = [check for check in self.checks if check.outcome == "error"]
        if errors:
            return f"WILL NOT LOAD: {errors[0].detail}"
        warnings = [check.name for check in self.checks if check.outcome == "warning"]
        if warnings:
            return f"loads with its intact prefix, with warnings ({', '.join(warnings)}), {WHERE_IT_LOADS}"
        return f"loads with its intact prefix {WHERE_IT_LOADS}"

    def _record(self, name: str, outcome: Outcome, detail: str) -> None:
        self.checks.append(Check(name, outcome, detail))


def inspect_checkpoint(checkpoint: str | os.PathLike[str]) -> CheckpointInspection:
    """Run the loaders' checks on ``checkpoint`` in their order; stops at the first one that fails."""
    report = CheckpointInspection(path=Path(checkpoint))
    config = _config_block(report)
    if config is None:
        return report
    if not _geometry_matches_model(report, config) or not _kv_cache_block_parses(report, config):
        return report
    stored = _prefix_tensors(report, config)
    if stored is None:
        return report
    _weight_files_are_clean(report, stored)
    _card_names_the_package(report)
    return report


def _config_block(report: CheckpointInspection) -> IntactKVConfig | None:
    try:
        config = read_config_block(report.path)
    except (OSError, ValueError) as error:  # pydantic's ValidationError is a ValueError
        report._record("config block", "error", _one_line(error))
        return None
    if config is None:
        report._record("config block", "error", f"config.json has no `{CONFIG_KEY}`: not an IntactKV checkpoint")
        return None
    report.block = config.to_config_value()
    report._record("config block", "ok", f"format version {config.format_version}, prefix {config.prefix_token_ids}")
    return config


def _geometry_matches_model(report: CheckpointInspection, config: IntactKVConfig) -> bool:
    try:
        geometry = kv_geometry(AutoConfig.from_pretrained(report.path))
    except (OSError, ValueError, KeyError) as error:
        report._record("model config", "error", f"transformers cannot read config.json: {_one_line(error)}")
        return False
    model = (geometry.num_layers, geometry.num_key_value_heads, geometry.head_dim)
    declared = (config.num_layers, config.num_key_value_heads, config.head_dim)
    if model != declared:
        report._record(
            "geometry", "error",
            f"the block declares (layers, kv heads, head dim) = {declared} but the model has {model}",
        )
        return False
    if geometry.max_position_embeddings is not None and config.prefix_length >= geometry.max_position_embeddings:
        report._record(
            "geometry", "error",
            f"a prefix of {config.prefix_length} tokens does not fit the context of "
            f"{geometry.max_position_embeddings} positions",
        )
        return False
    report._record("geometry", "ok", f"{declared[0]} layers, {declared[1]} KV heads, head dim {declared[2]}")
    return True


def _kv_cache_block_parses(report: CheckpointInspection, config: IntactKVConfig) -> bool:
    if config.kv_cache is None:
        return True
    try:
        KVQuantSettings.from_config_value(config.kv_cache)
    except ValueError as error:
        report._record("kv_cache block", "error", f"does not describe a KV-cache quantization: {_one_line(error)}")
        return False
    report._record("kv_cache block", "ok", "quantized KV cache (transformers applies it; vLLM keeps its own)")
    return True


def _prefix_tensors(report: CheckpointInspection, config: IntactKVConfig) -> StoredPrefix | None:
    try:
        stored = read_prefix_tensors(report.path, config)
    except (OSError, ValueError) as error:
        report._record("prefix tensors", "error", _one_line(error))
        return None
    for layer, (key, value) in enumerate(zip(stored.keys, stored.values)):
        for kind, tensor in ((KEY_BUFFER, key), (VALUE_BUFFER, value)):
            report.tensors[tensor_name(layer, kind)] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    report._record(
        "prefix tensors", "ok",
        f"{2 * config.num_layers} tensors of {config.buffer_shape} {config.dtype}, all finite",
    )
    return stored


def _weight_files_are_clean(report: CheckpointInspection, stored: StoredPrefix) -> None:
    if stored.source == report.path / SIDE_FILE_PATH:
        report._record("side file", "ok", f"{SIDE_FILE_PATH}; no weight file holds a prefix tensor")
        return
    holding = prefix_tensors_in_weight_files(report.path)
    report._record(
        "side file", "warning",
        f"no {SIDE_FILE_PATH}: the prefix is in {', '.join(holding)} (older layout); transformers loads it, vLLM "
        "refuses it. Load and save it again with intactkv_modifier imported to move it.",
    )


def _card_names_the_package(report: CheckpointInspection) -> None:
    if card_mentions_package(report.path):
        report._record("model card", "ok", f"{CARD_FILE} says that the prefix needs intactkv-modifier")
        return
    consequence = "so a user without it gets the plain model and no hint why"
    if (report.path / CARD_FILE).is_file():
        detail = f"{CARD_FILE} does not say that the prefix needs intactkv-modifier, {consequence}. Add: "
        detail += NEEDS_PACKAGE
    else:
        detail = (
            f"no {CARD_FILE} says that the prefix needs intactkv-modifier, {consequence}. Save the model again "
            "(every save writes the card)."
        )
    report._record("model card", "warning", detail)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
