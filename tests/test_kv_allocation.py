"""Settings that fail clearly, and the norm-driven bit allocator that respects its budget."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from pydantic import ValidationError
from tiny_models import load
from tolerances import EPS64

from intactkv_modifier.kv_quant import (
    KeyFavoredQuantizedCache,
    KVQuantSettings,
    TensorQuantSettings,
    allocate_bits,
    choose_bits,
    install_kv_quantization,
)

pytestmark = pytest.mark.numerics  # CI runs these under other CPU kernels and thread counts too


def test_settings_round_trip_through_json():
    settings = KVQuantSettings.from_bits(4, 2, group_size=16, residual_length=8).with_layer_bits([(8, 3), (4, 2)])
    stored = json.loads(json.dumps(settings.to_config_value()))

    assert KVQuantSettings.from_config_value(stored) == settings
    assert settings.for_layer(0)[0].bits == 8 and settings.for_layer(0)[1].bits == 3
    assert settings.for_layer(1)[0].granularity == "per_channel" and settings.for_layer(1)[1].group_size == 16
    assert settings.average_bits(2) == 4.25
    assert KVQuantSettings().label() == "K4V2"


def test_label_names_windows_that_delay_quantization():
    """A K4V2 cache with 256-token groups quantizes nothing below 288 tokens: the label says so."""
    assert KVQuantSettings.from_bits(4, 2, group_size=256, residual_length=32).label() == "K4V2 g256 r32"
    assert KVQuantSettings.from_bits(2, 2, group_size=32, residual_length=128).label() == "K2V2 g32 r128"
    mixed_groups = KVQuantSettings(values=TensorQuantSettings(bits=2, granularity="per_token", group_size=64))
    assert mixed_groups.label() == "K4V2 g32/g64 r32"
    assert KVQuantSettings.from_bits(4, 2, group_size=256, residual_length=32).full_precision_tokens() == 287
    assert KVQuantSettings().full_precision_tokens() == 63


@pytest.mark.parametrize(
    "value",
    [
        {"keys": {"bits": 5, "granularity": "per_channel"}},
        {"values": {"bits": 2, "granularity": "per_head"}},
        {"keys": {"bits": 4, "granularity": "per_channel", "group_size": 0}},
        {"residual_length": -1},
        {"residual_length": 1025},
        {"keys": {"bits": 4, "granularity": "per_channel", "group_size": 512}},
        {"layer_bits": []},
        {"kv_bits": 4},
    ],
)
def test_malformed_settings_are_rejected(value):
    with pytest.raises(ValidationError):
        KVQuantSettings.from_config_value(value)


def test_settings_are_frozen_and_need_an_object():
    with pytest.raises(ValidationError):
        KVQuantSettings().residual_length = 3
    with pytest.raises(ValidationError):
        KVQuantSettings().with_layer_bits([(4, 6)])
    with pytest.raises(ValueError, match="must be a JSON object"):
        KVQuantSettings.from_config_value([4, 2])


def test_settings_the_model_cannot_use_fail_at_install(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])  # head_dim 32, 2 layers
    per_token_24 = KVQuantSettings(values=TensorQuantSettings(bits=2, granularity="per_token", group_size=24))
    with pytest.raises(ValueError, match="group_size 24 does not divide head_dim 32"):
        install_kv_quantization(model, per_token_24)
    with pytest.raises(ValueError, match="layer_bits has 1 entries but the model has 2 layers"):
        install_kv_quantization(model, KVQuantSettings(layer_bits=[{"keys": 4, "values": 2}]))
    with pytest.raises(ValueError, match="not a multiple of 8"):
        TensorQuantSettings(bits=3, granularity="per_channel").check_head_dim(36, "keys")
    with pytest.raises(ValueError, match="full_precision_prefix must be >= 0"):
        KeyFavoredQuantizedCache(model.config, KVQuantSettings(), full_precision_prefix=-1)


def _distortion(key_norms, value_norms, bits) -> float:
    return sum(k**2 * 4.0**-kb + v**2 * 4.0**-vb for k, v, (kb, vb) in zip(key_norms, value_norms, bits))


@pytest.mark.parametrize("budget", [2.0, 2.5, 3.0, 3.75, 5.0, 8.0, 9.0])
def test_allocation_is_the_best_within_budget(budget):
    key_norms, value_norms = [20.0, 9.0, 14.0], [7.0, 12.0, 6.0]
    bits = choose_bits(key_norms, value_norms, budget)

    used = sum(k + v for k, v in bits)
    assert used <= budget * 6
    within = [
        list(zip(c[0::2], c[1::2]))
        for c in itertools.product((2, 3, 4, 8), repeat=6)
        if sum(c) <= budget * 6
    ]
    best = min(_distortion(key_norms, value_norms, c) for c in within)
    # the same float64 formula; an equally good choice sums its 6 positive terms in another order: 6 eps apart
    assert _distortion(key_norms, value_norms, bits) == pytest.approx(best, rel=6 * EPS64, abs=0)


def test_larger_key_norms_get_at_least_the_value_bits():
    generator = torch.Generator().manual_seed(0)
    values = (torch.rand(12, generator=generator) * 5 + 1).tolist()
    keys = [v * f for v, f in zip(values, (torch.rand(12, generator=generator) + 1.05).tolist())]
    for budget in (2.5, 3.0, 4.0, 5.5):
        bits = choose_bits(keys, values, budget, allowed_bits=(2, 3, 4, 8))
        assert sum(k + v for k, v in bits) <= budget * 24
        assert all(k >= v for k, v in bits)
        assert any(k > v for k, v in bits)


def test_budget_below_the_narrowest_width_is_rejected():
    with pytest.raises(ValueError, match="below the narrowest allowed width"):
        choose_bits([1.0], [1.0], 1.5)
    with pytest.raises(ValueError, match="below the narrowest allowed width"):
        choose_bits([1.0], [1.0], 3.5, allowed_bits=(4, 8))
    with pytest.raises(ValueError, match="subset of"):
        choose_bits([1.0], [1.0], 3.0, allowed_bits=(2, 5))


def test_allocate_bits_reads_the_projections_and_yields_usable_settings(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight *= 4  # keys clearly larger than values, as the paper finds

    allocation = allocate_bits(model, budget=3.0, norm="spectral")

    assert allocation.average_bits <= 3.0
    assert allocation.settings.average_bits(2) == allocation.average_bits
    for layer in allocation.layers:
        assert layer.key_frobenius > layer.value_frobenius and layer.key_spectral > layer.value_spectral
        assert layer.key_bits > layer.value_bits
    assert "| 0 |" in allocation.markdown()
    install_kv_quantization(model, allocation.settings)
    cache = model(input_ids=torch.tensor([[1, 5, 6, 7]])).past_key_values
    assert [layer.key_settings.bits for layer in cache.layers] == [a.key_bits for a in allocation.layers]
