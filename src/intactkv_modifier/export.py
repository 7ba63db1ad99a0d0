"""Quantizing a model with a recipe and saving it as an IntactKV checkpoint, with what it cost and fixed.

One function for ``intactkv quantize`` and the main job: load, run llm-compressor's
``oneshot`` on token windows, save compressed with the tokenizer, and measure
what a user decides on before shipping: the prefix, how far the quantized
model's own prefix KV is from the stored one (the error IntactKV replaces), the
IntactKV+Cal fit if the recipe asked for it, and the sizes on disk.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer

from intactkv_modifier.checkpoint import SIDE_FILE_PATH
from intactkv_modifier.kv_readout import replaced_error
from intactkv_modifier.recipes.fit import check_group_sizes
from intactkv_modifier.storage import config_of, prefix_kv_of

__all__ = ["QuantizedCheckpoint", "quantize_to_checkpoint", "weight_bytes"]


@dataclass(frozen=True)
class QuantizedCheckpoint:
    """What ``quantize_to_checkpoint`` wrote; ``*_error`` are mean relative errors over the layers."""

    path: Path
    recipe: Path
    prefix_token_ids: list[int]
    prefix_text: str
    key_error_replaced: float
    value_error_replaced: float
    calibration: dict[str, Any] | None
    source_weight_bytes: int | None
    weight_bytes: int
    sidecar_bytes: int
    seconds: float


def weight_bytes(directory: str | os.PathLike[str]) -> int | None:
    """Bytes of the top-level ``*.safetensors`` files; None when ``directory`` is not a local folder."""
    folder = Path(directory)
    return sum(path.stat().st_size for path in folder.glob("*.safetensors")) if folder.is_dir() else None


def quantize_to_checkpoint(
    model_source: str | os.PathLike[str],
    recipe: Path,
    out: Path,
    calibration: torch.Tensor,
    dtype: str | torch.dtype = "auto",
    recipe_name: str | None = None,
) -> QuantizedCheckpoint:
    """Quantize ``model_source`` with ``recipe`` (which must hold an ``IntactKVModifier``) into ``out``.

    ``calibration`` holds the token windows oneshot calibrates on, one per row. A group size that does
    not fit the model's layers fails before oneshot starts, in one line (``recipe_name`` names the recipe).
    """
    if "IntactKVModifier" not in recipe.read_text():
        raise ValueError(f"recipe {recipe} has no IntactKVModifier; add `IntactKVModifier: {{}}` to its modifiers")
    tokenizer = AutoTokenizer.from_pretrained(model_source)
    model = AutoModelForCausalLM.from_pretrained(model_source, dtype=dtype).eval()
    check_group_sizes(model, recipe, recipe_name)
    dataset = Dataset.from_dict(
        {"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()}
    )
    started = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=str(recipe),
        num_calibration_samples=calibration.shape[0],
        max_seq_length=calibration.shape[1],
    )
    seconds = time.perf_counter() - started
    config = config_of(model)
    if config is None:
        raise ValueError(f"oneshot with {recipe} stored no IntactKV prefix; does its IntactKVModifier run?")
    key_error, value_error = replaced_error(model, config.prefix_token_ids, prefix_kv_of(model))
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return QuantizedCheckpoint(
        path=out,
        recipe=recipe,
        prefix_token_ids=config.prefix_token_ids,
        prefix_text=tokenizer.decode(config.prefix_token_ids),
        key_error_replaced=key_error,
        value_error_replaced=value_error,
        calibration=config.calibration,
        source_weight_bytes=weight_bytes(model_source),
        weight_bytes=weight_bytes(out) or 0,
        sidecar_bytes=(out / SIDE_FILE_PATH).stat().st_size,
        seconds=seconds,
    )
