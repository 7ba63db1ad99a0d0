"""Prefix resolution and the config block: bad input fails with a message that names the fix."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from tiny_models import BOS, build_tokenizer

from intactkv_modifier import IntactKVConfig
from intactkv_modifier.prefix import resolve_prefix_token_ids


def resolve(**kwargs):
    defaults = dict(prefix_token_ids=None, prefix_text=None, tokenizer=None, max_positions=64)
    return resolve_prefix_token_ids(**{**defaults, **kwargs})


def test_default_prefix_is_bos_when_the_tokenizer_adds_it():
    assert resolve(tokenizer=build_tokenizer(adds_bos=True)) == [BOS]


def test_prefix_text_is_tokenized_as_prompts_are():
    assert resolve(prefix_text="w7 w8", tokenizer=build_tokenizer(adds_bos=True)) == [BOS, 11, 12]
    assert resolve(prefix_text="w7 w8", tokenizer=build_tokenizer(adds_bos=False)) == [11, 12]


def test_tokenizer_without_bos_needs_an_explicit_prefix():
    with pytest.raises(ValueError, match="set `prefix_chat_template: true`.*otherwise `prefix_text`"):
        resolve(tokenizer=build_tokenizer(adds_bos=False))


def test_missing_tokenizer_is_named():
    with pytest.raises(ValueError, match="no tokenizer was found"):
        resolve()
    with pytest.raises(ValueError, match="needs a tokenizer"):
        resolve(prefix_text="w1")


def test_prefix_must_be_shorter_than_the_context():
    with pytest.raises(ValueError, match="must be shorter than the context"):
        resolve(prefix_token_ids=[5] * 64)


def test_both_prefix_settings_conflict():
    with pytest.raises(ValueError, match="not both"):
        resolve(prefix_token_ids=[1], prefix_text="w1")


def test_config_block_round_trips_and_validates():
    config = IntactKVConfig(
        prefix_token_ids=[1, 2], num_layers=2, num_key_value_heads=2, head_dim=32, dtype="bfloat16"
    )
    assert IntactKVConfig.from_config_value(config.to_config_value()) == config
    assert config.buffer_shape == (2, 2, 32) and config.torch_dtype == torch.bfloat16
    with pytest.raises(ValidationError):
        IntactKVConfig(prefix_token_ids=[-1], num_layers=2, num_key_value_heads=2, head_dim=32, dtype="float16")
    with pytest.raises(ValueError, match="must be an object"):
        IntactKVConfig.from_config_value([1, 2])
    with pytest.raises(ValueError, match="stores float32, float16 or bfloat16"):
        IntactKVConfig.dtype_name(torch.int8)
