"""Where each row of a left-padded batch starts.

The intact prefix splice (which rows start with the prefix) and the quantized
KV cache (which cached positions are padding) both need it, and must agree.
"""

from __future__ import annotations

import torch


def first_attended_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's first attended token in a 2-D mask: its left padding; the mask's width for an empty row."""
    mask = attention_mask.bool()
    width = torch.full_like(mask[:, 0], mask.shape[1], dtype=torch.long)
    return torch.where(mask.any(dim=1), mask.int().argmax(dim=1), width)
