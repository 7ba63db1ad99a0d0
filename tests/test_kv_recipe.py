"""KV-cache quantization from a recipe: installed by the modifier, recorded in the checkpoint, re-applied on load."""

from __future__ import annotations

import json

import pytest
import torch
from test_modifier import gptq, quantize
from tiny_models import BOS, load

from intactkv_modifier import CONFIG_KEY, IntactKVModifier
from intactkv_modifier.kv_quant import KeyFavoredQuantizedCache, KVQuantSettings, allocate_bits, kv_quantization_of

pytestmark = pytest.mark.numerics  # CI runs these under other CPU kernels and thread counts too

K4V2 = KVQuantSettings.from_bits(4, 2, group_size=8, residual_length=4)


def _prompt() -> torch.Tensor:
    return torch.tensor([[BOS, *range(10, 40)]])


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_recipe_kv_cache_is_installed_saved_and_reapplied_on_load(tiny_model_dirs, tmp_path, architecture):
    """Gemma 3 too: its sliding-window layers get quantized sliding layers; the prompt outgrows the window."""
    model = quantize(tiny_model_dirs[architecture], [gptq(), IntactKVModifier(kv_cache=K4V2)])
    assert kv_quantization_of(model).settings == K4V2
    model.save_pretrained(tmp_path, save_compressed=True)
    block = json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY]
    assert KVQuantSettings.from_config_value(block["kv_cache"]) == K4V2

    reloaded = load(tmp_path)
    assert kv_quantization_of(reloaded).settings == K4V2
    with torch.no_grad():
        output = reloaded(input_ids=_prompt(), use_cache=True)
        expected = model(input_ids=_prompt(), use_cache=True)
    assert isinstance(output.past_key_values, KeyFavoredQuantizedCache)
    # bit-identical weights and settings, the same forward: the same sums in the same order
    assert torch.equal(output.logits, expected.logits)
    generated = reloaded.generate(_prompt(), max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, model.generate(_prompt(), max_new_tokens=8, do_sample=False))


def test_checkpoint_without_kv_cache_decodes_with_the_fp_cache(tiny_model_dirs, tmp_path):
    model = quantize(tiny_model_dirs["llama"], [gptq(), IntactKVModifier()])
    model.save_pretrained(tmp_path, save_compressed=True)
    assert "kv_cache" not in json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY]
    assert kv_quantization_of(load(tmp_path)) is None


def test_bit_budget_allocates_from_the_full_precision_projections(tiny_model_dirs):
    expected = allocate_bits(load(tiny_model_dirs["llama"]), 3.0, base=K4V2).settings
    modifier = IntactKVModifier(kv_cache=K4V2, kv_cache_bit_budget=3.0)
    model = quantize(tiny_model_dirs["llama"], [gptq(), modifier])
    assert modifier.kv_cache_settings == expected
    assert kv_quantization_of(model).settings == expected
    assert expected.average_bits(len(expected.layer_bits)) <= 3.0


def test_kv_cache_settings_the_model_cannot_use_fail_before_quantizing(tiny_model_dirs):
    odd_groups = KVQuantSettings.from_bits(4, 2, group_size=12)  # head_dim 32 is not a multiple of 12
    with pytest.raises(ValueError, match="group_size 12 does not divide head_dim 32"):
        quantize(tiny_model_dirs["llama"], [gptq(), IntactKVModifier(kv_cache=odd_groups)])


def test_checkpoint_with_an_invalid_kv_cache_block_fails_to_load_clearly(tiny_model_dirs, tmp_path):
    model = quantize(tiny_model_dirs["llama"], [gptq(), IntactKVModifier(kv_cache=K4V2)])
    model.save_pretrained(tmp_path, save_compressed=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config[CONFIG_KEY]["kv_cache"]["keys"]["bits"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="kv_cache` does not describe a KV-cache quantization"):
        load(tmp_path)
