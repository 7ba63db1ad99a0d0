"""The versioned config block that tells a loader which tokens the stored K/V belong to.

It travels in ``config.json`` under :data:`CONFIG_KEY`, next to llm-compressor's
``quantization_config``, so that a checkpoint is self-describing: a loader can
check the stored tensors against the model before trusting them, and refuse a
format it does not know instead of silently misreading it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["CONFIG_KEY", "FORMAT_VERSION", "KEY_BUFFER", "VALUE_BUFFER", "IntactKVConfig"]

CONFIG_KEY = "intactkv_config"
#: Version 2 adds ``side_file_sha256``, which ties the block to the exact side file it
#: was saved with; version 1 blocks (no digest) are still read, without that check.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: Fields that decide what the stored tensors are; the side file repeats them, so a block
#: edited after saving, or a side file from another checkpoint, is recognised.
TENSOR_FIELDS = ("prefix_token_ids", "num_layers", "num_key_value_heads", "head_dim", "dtype", "layout")
#: Names of the (non-persistent) buffers registered on every attention module,
#: and the last part of each tensor's name in the checkpoint's side file
#: (:data:`intactkv_modifier.checkpoint.SIDE_FILE_PATH`).
KEY_BUFFER = "intact_key"
VALUE_BUFFER = "intact_value"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class IntactKVConfig(BaseModel):
    """Describes the stored pivot-token K/V of one checkpoint.

    ``layout`` names the tensor layout of each buffer: one entry per attention
    layer, shaped ``[num_key_value_heads, prefix_length, head_dim]``, keys taken
    after the rotary embedding (exactly what a KV cache holds). ``kv_cache`` is
    optional: a checkpoint without it decodes with transformers' FP cache.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1, 2] = FORMAT_VERSION
    prefix_token_ids: list[int] = Field(min_length=1)
    num_layers: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    dtype: Literal["float32", "float16", "bfloat16"]
    layout: Literal["heads_tokens_dim_post_rope"] = "heads_tokens_dim_post_rope"
    calibration: dict[str, Any] | None = None
    #: KV-cache quantization the loader installs, as
    #: :meth:`~intactkv_modifier.kv_quant.settings.KVQuantSettings.to_config_value` writes it
    kv_cache: dict[str, Any] | None = None
    #: sha256 of the side file's bytes, written last by a save; a version 2 block without it
    #: comes from a save that did not finish, and the loader refuses it.
    side_file_sha256: str | None = Field(default=None, pattern="^[0-9a-f]{64}$")

    @field_validator("prefix_token_ids")
    @classmethod
    def _non_negative_ids(cls, ids: list[int]) -> list[int]:
        if any(i < 0 for i in ids):
            raise ValueError(f"prefix_token_ids must be non-negative token ids, got {ids}")
        return ids

    @property
    def prefix_length(self) -> int:
        return len(self.prefix_token_ids)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def buffer_shape(self) -> tuple[int, int, int]:
        return (self.num_key_value_heads, self.prefix_length, self.head_dim)

    @staticmethod
    def dtype_name(dtype: torch.dtype) -> Literal["float32", "float16", "bfloat16"]:
        for name, candidate in _DTYPES.items():
            if candidate == dtype:
                return name  # type: ignore[return-value]
        raise ValueError(f"IntactKV stores float32, float16 or bfloat16 tensors, not {dtype}")

    @classmethod
    def from_config_value(cls, value: Any) -> IntactKVConfig:
        """Parse the block as found in ``config.json``, rejecting unknown formats clearly."""
        if isinstance(value, IntactKVConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"`{CONFIG_KEY}` in config.json must be an object, got {type(value).__name__}")
        version = value.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"`{CONFIG_KEY}` has format_version {version!r}; this intactkv-modifier reads "
                f"versions {list(READABLE_VERSIONS)}. Upgrade intactkv-modifier to load this checkpoint."
            )
        return cls.model_validate(value)

    def to_config_value(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def tensor_fields(self) -> dict[str, Any]:
        """What the side file must agree on with the block (see :data:`TENSOR_FIELDS`)."""
        return self.model_dump(mode="json", include=set(TENSOR_FIELDS))

    def unsealed(self) -> IntactKVConfig:
        """The block a model carries in memory and re-saves: current version, no digest until the side file exists."""
        return self.model_copy(update={"format_version": FORMAT_VERSION, "side_file_sha256": None})
