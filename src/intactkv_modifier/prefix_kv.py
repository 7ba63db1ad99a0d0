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
