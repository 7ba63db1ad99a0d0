"""Quantizers that change the decoder in ways IntactKV cannot follow are refused, and leave the model as it was."""

from __future__ import annotations

import pytest
import torch
from helpers import PREFIX, logits, round_linear_weights
from tiny_models import load

from intactkv_modifier import config_of
from intactkv_modifier.architecture import attention_modules, decoder_stack
from intactkv_modifier.integrations import IntactPrefix, UnfollowableModelError
from intactkv_modifier.integrations.structure import quantization_signs, transformers_model
from intactkv_modifier.runtime import IntactKVRuntime


class FusedAttention(torch.nn.Module):
    """Stands for a quantizer's own attention kernel: the original module's work, under another class."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.layer_idx = inner.layer_idx

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


class CacheThatIsIgnored:
    """A cache whose ``update`` stores what it is given but hands the attention's own K/V back."""

    def __init__(self, inner):
        self.inner = inner

    def update(self, keys, values, layer_idx, *args, **kwargs):
        if self.inner is not None:
            self.inner.update(keys, values, layer_idx, *args, **kwargs)
        return keys, values

    def __getattr__(self, name):
        return getattr(self.inner, name)


def captured(directory) -> tuple[torch.nn.Module, IntactPrefix]:
    model = load(directory)
    intact = IntactPrefix.capture(model, settings={"prefix_token_ids": PREFIX})
    round_linear_weights(model)
    return model, intact


def assert_left_as_it_was(model, before: torch.Tensor) -> None:
    assert config_of(model) is None and IntactKVRuntime.of(model) is None
    assert not any(hasattr(attention, "intact_key") for attention in attention_modules(model))
    assert "save_pretrained" not in vars(model)
    assert torch.equal(logits(model), before)


def test_a_quantizer_that_replaces_the_attention_modules_is_refused(tiny_model_dirs):
    model, intact = captured(tiny_model_dirs["llama"])
    block = decoder_stack(model).layers[1]
    block.self_attn = FusedAttention(block.self_attn)
    before = logits(model)
    with pytest.raises(UnfollowableModelError, match=r"replaced the attention modules of layers \[1\].*FusedAttention"):
        intact.attach(model)
    assert_left_as_it_was(model, before)


def test_attention_that_never_writes_the_cache_is_refused(tiny_model_dirs):
    """Same class, but the cache never reaches it (a fused kernel keeping its own): found by running the model."""
    model, intact = captured(tiny_model_dirs["llama"])
    attention = decoder_stack(model).layers[0].self_attn
    original = attention.forward
    attention.forward = lambda *args, **kwargs: original(*args, **{**kwargs, "past_key_values": None})
    before = logits(model)
    with pytest.raises(UnfollowableModelError, match=r"layers \[0\] never wrote their KV"):
        intact.attach(model)
    assert_left_as_it_was(model, before)


def test_attention_that_ignores_what_the_cache_hands_back_is_refused(tiny_model_dirs):
    model, intact = captured(tiny_model_dirs["llama"])
    attention = decoder_stack(model).layers[1].self_attn
    original = attention.forward
    attention.forward = lambda *args, **kwargs: original(
        *args, **{**kwargs, "past_key_values": CacheThatIsIgnored(kwargs.get("past_key_values"))}
    )
    before = logits(model)
    with pytest.raises(UnfollowableModelError, match=r"layers \[1\] of the quantized model do not attend"):
        intact.attach(model)
    assert_left_as_it_was(model, before)


def test_a_quantizer_that_drops_layers_is_refused(tiny_model_dirs):
    model, intact = captured(tiny_model_dirs["llama"])
    del decoder_stack(model).layers[1]
    model.config.num_hidden_layers = 1
    with pytest.raises(UnfollowableModelError, match="KV geometry"):
        intact.attach(model)


def test_a_decoder_without_attention_layers_is_refused(tiny_model_dirs):
    model, intact = captured(tiny_model_dirs["llama"])
    del decoder_stack(model).layers[0].self_attn
    with pytest.raises(UnfollowableModelError, match="cannot find the attention layers"):
        intact.attach(model)


def test_wrappers_are_seen_through_and_other_objects_refused(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])

    class Wrapper:  # optimum-quanto's QuantizedModelForCausalLM keeps the model in `_wrapped`
        def __init__(self, wrapped):
            self._wrapped = wrapped

    assert transformers_model(Wrapper(model)) is model
    with pytest.raises(TypeError, match="applies to transformers models"):
        transformers_model(torch.nn.Linear(2, 2))


def test_quantized_weights_and_modules_are_recognised(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    assert quantization_signs(model) == []
    model.model.layers[0].mlp.up_proj.quantization_scheme = object()  # llm-compressor's mark on a module
    assert quantization_signs(model) == ["llm-compressor quantization schemes are attached"]
