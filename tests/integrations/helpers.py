"""What the integration tests share: an in-place quantizer that needs no library, and the checks every route makes."""

from __future__ import annotations

import torch
from tiny_models import BOS

from intactkv_modifier import prefix_kv_of
from intactkv_modifier.prefix_kv import PrefixKV

#: A three-token prefix: [BOS] and two words, so multi-token prefixes are what every route is tested with.
PREFIX = [BOS, 7, 8]
PROMPT = torch.tensor([[*PREFIX, 20, 31, 42, 53, 64]])


@torch.no_grad()
def round_linear_weights(model: torch.nn.Module, bits: int = 3) -> None:
    """Symmetric per-row round-to-nearest of every decoder ``nn.Linear`` weight, in place: a stand-in quantizer
    that keeps the weights float, so the neutral API is tested apart from any quantization library."""
    levels = 2 ** (bits - 1) - 1
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "layers." in name:
            scale = module.weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / levels
            module.weight.copy_((module.weight / scale).round().clamp(-levels, levels) * scale)


def assert_same_kv(actual: PrefixKV, expected: PrefixKV) -> None:
    assert len(actual.keys) == len(expected.keys)
    for a, b in zip(actual.keys + actual.values, expected.keys + expected.values):
        assert torch.equal(a.to(b.dtype), b)


def assert_carries(model: torch.nn.Module, expected: PrefixKV) -> None:
    """The model's stored prefix K/V are exactly ``expected`` (the full-precision capture)."""
    assert_same_kv(prefix_kv_of(model), expected)


def logits(model: torch.nn.Module, ids: torch.Tensor = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()
