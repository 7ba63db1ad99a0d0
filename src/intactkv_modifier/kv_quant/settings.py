"""What a key-favored quantized KV cache stores: bits, grouping and the full-precision windows.

Keys and values get separate settings because they want different treatment:
keys have a few outlier *channels* (so they are grouped per channel, along the
token axis) and carry more information (arXiv 2502.15075: larger projection
norms, so they deserve more bits); values are grouped per token (KIVI,
arXiv 2402.02750). The settings are plain JSON so that a checkpoint's
``config.json`` can carry them and a loader can re-apply them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from intactkv_modifier.architecture import KVGeometry
from intactkv_modifier.kv_quant.packing import packing_unit

__all__ = ["Bits", "Granularity", "KVQuantSettings", "LayerBits", "TensorQuantSettings", "SUPPORTED_BITS"]

Bits = Literal[2, 3, 4, 8]
SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)
Granularity = Literal["per_channel", "per_token"]
#: Bounds that keep a label such as ``K4V2`` true of ordinary contexts: a per-channel
#: group of this many tokens, after the residual window, is quantized from 1280 tokens on
#: (head_dim, which a per-token group divides, is at most 256 in the supported models)
MAX_GROUP_SIZE = 256
MAX_RESIDUAL_LENGTH = 1024


class TensorQuantSettings(BaseModel):
    """Asymmetric min/max quantization of one tensor (keys or values) of the cache.

    Every group of ``group_size`` elements shares a scale and a minimum (the zero
    point, kept as a float so it is exactly the group's minimum). ``per_channel``
    groups run along the token axis: one scale per channel for each block of
    ``group_size`` consecutive tokens, so tokens are quantized in whole blocks and
    the newest, incomplete block stays in full precision. ``per_token`` groups run
    along the channel axis: each token has ``head_dim / group_size`` scales per head.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Bits
    granularity: Granularity
    group_size: int = Field(default=32, gt=0, le=MAX_GROUP_SIZE)

    @property
    def token_block(self) -> int:
        """How many tokens must be present before any of them can be quantized."""
        return self.group_size if self.granularity == "per_channel" else 1

    def check_head_dim(self, head_dim: int, what: str) -> None:
        """Reject settings that cannot pack or group a head of ``head_dim`` channels."""
        if self.granularity == "per_token" and head_dim % self.group_size:
            raise ValueError(
                f"{what}: per_token group_size {self.group_size} does not divide head_dim {head_dim}; "
                f"choose a divisor of {head_dim}."
            )
        codes, nbytes = packing_unit(self.bits)
        if head_dim % codes:
            raise ValueError(
                f"{what}: {self.bits}-bit codes are packed {codes} per {nbytes} byte(s) along head_dim, "
                f"but head_dim {head_dim} is not a multiple of {codes}."
            )


class LayerBits(BaseModel):
    """Bit widths of one decoder layer, overriding the default keys/values bits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: Bits
    values: Bits


class KVQuantSettings(BaseModel):
    """How every layer's KV cache is quantized.

    :param keys: key settings; defaults to 4-bit, per channel (KIVI's finding)
    :param values: value settings; defaults to 2-bit, per token (K4V2, the
        key-favored split of arXiv 2502.15075)
    :param residual_length: the newest tokens kept in full precision (KIVI's
        residual): they are attended exactly and quantized only once they fall
        out of this window (per-channel keys wait for a whole block beyond it)
    :param layer_bits: optional per-layer bit widths, one entry per decoder layer
        (what :func:`~intactkv_modifier.kv_quant.allocation.allocate_bits` chooses);
        granularity and group size still come from ``keys``/``values``
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: TensorQuantSettings = TensorQuantSettings(bits=4, granularity="per_channel", group_size=32)
    values: TensorQuantSettings = TensorQuantSettings(bits=2, granularity="per_token", group_size=32)
    residual_length: int = Field(default=32, ge=0, le=MAX_RESIDUAL_LENGTH)
    layer_bits: list[LayerBits] | None = Field(default=None, min_length=1)

    @classmethod
    def from_bits(
        cls, key_bits: int, value_bits: int, *, group_size: int = 32, residual_length: int = 32
    ) -> KVQuantSettings:
        """``KVQuantSettings.from_bits(4, 2)``: keys per channel, values per token, with these bit widths."""
        return cls(
            keys=TensorQuantSettings(bits=key_bits, granularity="per_channel", group_size=group_size),
            values=TensorQuantSettings(bits=value_bits, granularity="per_token", group_size=group_size),
            residual_length=residual_length,
        )

    def with_layer_bits(self, bits: Sequence[tuple[int, int]]) -> KVQuantSettings:
        """These settings with ``(key_bits, value_bits)`` per layer, validated."""
        layer_bits = [{"keys": keys, "values": values} for keys, values in bits]
        return type(self).model_validate({**self.model_dump(), "layer_bits": layer_bits})

    def for_layer(self, layer_idx: int) -> tuple[TensorQuantSettings, TensorQuantSettings]:
        """Key and value settings of one layer, with its bit override applied."""
        if self.layer_bits is None:
            return self.keys, self.values
        bits = self.layer_bits[layer_idx]
        return self.keys.model_copy(update={"bits": bits.keys}), self.values.model_copy(update={"bits": bits.values})

    def check_model(self, geometry: KVGeometry) -> None:
        """Fail before the first forward, naming the setting to change, when the model cannot use these settings."""
        if self.layer_bits is not None and len(self.layer_bits) != geometry.num_layers:
            raise ValueError(
                f"layer_bits has {len(self.layer_bits)} entries but the model has {geometry.num_layers} layers"
            )
        for layer_idx in range(geometry.num_layers):
            keys, values = self.for_layer(layer_idx)
            keys.check_head_dim(geometry.head_dim, f"keys of layer {layer_idx}")
            values.check_head_dim(geometry.head_dim, f"values of layer {layer_idx}")

    def average_bits(self, num_layers: int) -> float:
        """Mean code bits per cached key/value element (keys and values have equally many)."""
        pairs = [self.for_layer(i) for i in range(num_layers)]
        return sum(k.bits + v.bits for k, v in pairs) / (2 * num_layers)

    def label(self) -> str:
        """``K4V2``, or ``mixed 3.00 bits`` when layers differ; ``K4V2 g128 r256`` away from the default windows.

        Group size and residual decide from which context on anything is quantized
        (:meth:`full_precision_tokens`), so a label without them would overstate the saving.
        """
        bits = (
            f"K{self.keys.bits}V{self.values.bits}"
            if self.layer_bits is None
            else f"mixed {self.average_bits(len(self.layer_bits)):.2f} bits"
        )
        keys, values = self.keys.group_size, self.values.group_size
        groups = f"g{keys}" if keys == values else f"g{keys}/g{values}"
        return bits if (groups, self.residual_length) == ("g32", 32) else f"{bits} {groups} r{self.residual_length}"

    def full_precision_tokens(self) -> int:
        """The most newest tokens a layer keeps exact (after the prefix): the residual plus an unfilled key block."""
        return self.residual_length + math.lcm(self.keys.token_block, self.values.token_block) - 1

    @classmethod
    def from_config_value(cls, value: Any) -> KVQuantSettings:
        """Parse the JSON object stored in a checkpoint's ``config.json``."""
        if isinstance(value, KVQuantSettings):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"KV-cache quantization settings must be a JSON object, got {type(value).__name__}")
        return cls.model_validate(value)

    def to_config_value(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

