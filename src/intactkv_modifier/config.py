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
FORMAT_VERSION = 1
#: Names of the (non-persistent) buffers registered on every attention module,
#: and the last part of each tensor's name in the checkpoint's side file
#: (:data:`intactkv_modifier.sidecar.SIDECAR_PATH`).
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

    format_version: Literal[1] = FORMAT_VERSION
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
        if version != FORMAT_VERSION:
            raise ValueError(
                f"`{CONFIG_KEY}` has format_version {version!r}; this intactkv-modifier reads "
                f"version {FORMAT_VERSION}. Upgrade intactkv-modifier to load this checkpoint."
            )
        return cls.model_validate(value)

    def to_config_value(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)
