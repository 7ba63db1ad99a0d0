"""The prefix K/V as one value: what capture produces, calibration fits, the checkpoint stores and loading applies.

Its own module, free of llm-compressor, because loading a checkpoint needs it
where llm-compressor is not installed (serving and evaluation environments).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PrefixKV"]


@dataclass
class PrefixKV:
    """Per-layer prefix keys and values, each ``[num_key_value_heads, prefix_length, head_dim]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values):
            raise ValueError(f"{len(self.keys)} key tensors but {len(self.values)} value tensors")

    def truncated(self, length: int) -> PrefixKV:
        """The KV of the prefix's first ``length`` tokens: with causal attention exactly what capturing that
        shorter prefix alone gives (no position attends to later ones), so one capture serves both."""
        if not 0 < length <= self.keys[0].shape[1]:
            raise ValueError(f"cannot keep {length} of a {self.keys[0].shape[1]}-token prefix")
        return PrefixKV(
            keys=[k[:, :length].clone() for k in self.keys], values=[v[:, :length].clone() for v in self.values]
        )
