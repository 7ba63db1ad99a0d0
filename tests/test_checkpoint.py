"""The compressed-tensors checkpoint carries the prefix KV and applies it on load."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from test_modifier import gptq, quantize
from tiny_models import BOS, load, load_tokenizer, text_samples

from intactkv_modifier import CONFIG_KEY, IntactKVModifier, config_of, intact_kv_disabled, prefix_kv_of


@pytest.fixture(scope="module")
def saved_checkpoint(tiny_model_dirs, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = quantize(tiny_model_dirs["llama"], [gptq(), IntactKVModifier()])
    out = tmp_path_factory.mktemp("ckpt") / "llama-w4a16-intactkv"
    model.save_pretrained(out, save_compressed=True)
    load_tokenizer(tiny_model_dirs["llama"]).save_pretrained(out)
    return model, out


def _load_warnings(directory: Path, caplog: pytest.LogCaptureFixture) -> tuple[torch.nn.Module, list[str]]:
    transformers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            model = load(directory)
    finally:
        transformers.utils.logging.disable_propagation()
    return model, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_checkpoint_holds_tensors_and_a_versioned_config_block(saved_checkpoint):
    model, out = saved_checkpoint
    block = json.loads((out / "config.json").read_text())[CONFIG_KEY]
    assert block["format_version"] == 1
    assert block["prefix_token_ids"] == [BOS]
    assert (block["num_layers"], block["num_key_value_heads"], block["head_dim"]) == (2, 2, 32)
    assert block["dtype"] == "float32"
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        names = {n for n in handle.keys() if "intact" in n}
    assert names == {f"model.layers.{i}.self_attn.intact_{kind}" for i in range(2) for kind in ("key", "value")}


def test_round_trip_is_bit_exact_and_silent(saved_checkpoint, caplog):
    model, out = saved_checkpoint
    loaded, warnings = _load_warnings(out, caplog)

    assert not [w for w in warnings if "unexpected" in w.lower() or "missing" in w.lower()], warnings
    assert config_of(loaded) == config_of(model)
    stored, reloaded = prefix_kv_of(model), prefix_kv_of(loaded)
    for a, b in zip(stored.keys + stored.values, reloaded.keys + reloaded.values):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_loaded_checkpoint_applies_the_prefix_automatically(saved_checkpoint):
    model, out = saved_checkpoint
    loaded = load(out)
    tokenizer = load_tokenizer(out)
    batch = tokenizer(text_samples(2, 10), return_tensors="pt")

    with intact_kv_disabled(loaded):
        baseline = loaded(**batch).logits
    applied = loaded(**batch).logits

    torch.testing.assert_close(applied, model(**batch).logits, atol=1e-5, rtol=1e-5)
    assert (applied - baseline).abs().max() > 1e-4


def test_resaving_a_loaded_checkpoint_keeps_the_block(saved_checkpoint, tmp_path):
    _, out = saved_checkpoint
    load(out).save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())[CONFIG_KEY]["prefix_token_ids"] == [BOS]


def _copy_with_config(out: Path, target: Path, edit) -> Path:
    target.mkdir()
    for item in out.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_checkpoint_for_another_geometry_is_rejected(saved_checkpoint, tmp_path):
    _, out = saved_checkpoint
    broken = _copy_with_config(out, tmp_path / "broken", lambda c: c[CONFIG_KEY].update(num_key_value_heads=4))
    with pytest.raises(ValueError, match="does not belong to this model"):
        load(broken)


def test_tensors_that_do_not_match_the_block_are_rejected(saved_checkpoint, tmp_path):
    _, out = saved_checkpoint
    broken = _copy_with_config(out, tmp_path / "broken", lambda c: c[CONFIG_KEY].update(prefix_token_ids=[BOS, 5]))
    with pytest.raises(ValueError, match="does not match its config"):
        load(broken)


def test_unknown_format_version_is_rejected(saved_checkpoint, tmp_path):
    _, out = saved_checkpoint
    broken = _copy_with_config(out, tmp_path / "broken", lambda c: c[CONFIG_KEY].update(format_version=99))
    with pytest.raises(ValueError, match="format_version 99"):
        load(broken)


def test_checkpoint_without_the_tensors_is_rejected(saved_checkpoint, tmp_path):
    _, out = saved_checkpoint
    stripped = _copy_with_config(out, tmp_path / "stripped", lambda c: None)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        kept = {n: handle.get_tensor(n) for n in handle.keys() if "intact" not in n}
        metadata = handle.metadata()
    save_file(kept, str(stripped / "model.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="4 prefix tensors are missing"):
        load(stripped)
