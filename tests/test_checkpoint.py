"""The checkpoint keeps the prefix K/V in a side file, out of every weight file, and applies it on load."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from huggingface_hub import HfApi
from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained
from loguru import logger
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_modifier import gptq, quantize
from tiny_models import BOS, load, load_tokenizer, run_python, text_samples
from tolerances import beyond, relative_error, two_forwards
from transformers import AutoModelForCausalLM

import intactkv_modifier.checkpoint.files
import intactkv_modifier.checkpoint.folder
import intactkv_modifier.loading
import intactkv_modifier.storage
from intactkv_modifier import (
    CONFIG_KEY,
    IntactKVModifier,
    attach_intact_kv,
    capture_prefix_kv,
    config_of,
    intact_kv_disabled,
    prefix_kv_of,
)
from intactkv_modifier.checkpoint import SIDE_FILE_PATH, tensor_name
from intactkv_modifier.config import KEY_BUFFER, VALUE_BUFFER
from intactkv_modifier.serving import prefix_tensors_in_weight_files

LAYERS, BUFFER_SHAPE = 2, (2, 1, 32)  # the tiny Llama's layers and [kv heads, prefix length, head dim] for [BOS]


@pytest.fixture(scope="module")
def saved_checkpoint(tiny_model_dirs, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """Quantized by llm-compressor and saved compressed."""
    model = quantize(tiny_model_dirs["llama"], [gptq(), IntactKVModifier()])
    out = tmp_path_factory.mktemp("ckpt") / "llama-w4a16-intactkv"
    model.save_pretrained(out, save_compressed=True)
    load_tokenizer(tiny_model_dirs["llama"]).save_pretrained(out)
    return model, out


@pytest.fixture(scope="module")
def plain_checkpoint(tiny_model_dirs, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """Transformers' own save, sharded so that the weight files come with an index."""
    model = load(tiny_model_dirs["llama"])
    attach_intact_kv(model, [BOS], capture_prefix_kv(model, [BOS]))
    out = tmp_path_factory.mktemp("ckpt") / "llama-fp-intactkv"
    model.save_pretrained(out, max_shard_size="100KB")
    return model, out


@pytest.fixture(params=["saved_checkpoint", "plain_checkpoint"], ids=["compressed", "plain"])
def checkpoint(request) -> tuple[torch.nn.Module, Path]:
    return request.getfixturevalue(request.param)


def _load_warnings(directory: Path, caplog: pytest.LogCaptureFixture) -> tuple[torch.nn.Module, list[str]]:
    transformers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            model = load(directory)
    finally:
        transformers.utils.logging.disable_propagation()
    return model, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _weight_tensor_names(directory: Path) -> set[str]:
    """Every tensor name a weight loader sees: the top-level safetensors files and the index."""
    names: set[str] = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            names.update(handle.keys())
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names.update(json.loads(index.read_text())["weight_map"])
    return names


def _assert_same_prefix(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    """Same dtype and bits; compared on the CPU, since llm-compressor may leave ``expected`` on a GPU."""
    a, b = prefix_kv_of(actual), prefix_kv_of(expected)
    assert len(a.keys) == len(b.keys) == LAYERS
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu())


# ---------------------------------------------------------------------------------------------- layout


def test_checkpoint_holds_a_versioned_config_block(saved_checkpoint):
    _, out = saved_checkpoint
    config = json.loads((out / "config.json").read_text())
    block = config[CONFIG_KEY]
    assert block["format_version"] == 2
    assert block["side_file_sha256"] == hashlib.sha256((out / SIDE_FILE_PATH).read_bytes()).hexdigest()
    assert block["prefix_token_ids"] == [BOS]
    assert (block["num_layers"], block["num_key_value_heads"], block["head_dim"]) == (LAYERS, 2, 32)
    assert block["dtype"] == "float32"
    assert "quantization_config" in config


def test_weight_files_hold_no_prefix_tensor(checkpoint):
    _, out = checkpoint
    names = _weight_tensor_names(out)
    assert any(name.endswith("self_attn.q_proj.weight_packed") or name.endswith("q_proj.weight") for name in names)
    assert not [name for name in names if "intact" in name]
    assert prefix_tensors_in_weight_files(out) == []


def test_plain_save_is_sharded_with_an_index(plain_checkpoint):
    """Guards the test above: the plain checkpoint does exercise several shards and an index."""
    _, out = plain_checkpoint
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1


@pytest.mark.numerics
def test_side_file_matches_the_block_and_the_model(checkpoint):
    model, out = checkpoint
    block = json.loads((out / "config.json").read_text())[CONFIG_KEY]
    assert sorted(p.name for p in (out / SIDE_FILE_PATH).parent.iterdir()) == ["prefix_kv.safetensors"]  # no temp file
    stored = load_file(out / SIDE_FILE_PATH)
    expected_names = {tensor_name(layer, kind) for layer in range(LAYERS) for kind in (KEY_BUFFER, VALUE_BUFFER)}
    assert set(stored) == expected_names
    assert tensor_name(1, VALUE_BUFFER) == "layers.1.self_attn.intact_value"
    kv = prefix_kv_of(model)
    for layer in range(LAYERS):
        for kind, held in ((KEY_BUFFER, kv.keys[layer]), (VALUE_BUFFER, kv.values[layer])):
            tensor = stored[tensor_name(layer, kind)]
            assert tuple(tensor.shape) == BUFFER_SHAPE == (block["num_key_value_heads"], 1, block["head_dim"])
            assert tensor.dtype == torch.float32 and block["dtype"] == "float32"
            assert torch.equal(tensor, held.cpu())


def test_buffers_are_not_persistent(plain_checkpoint):
    model, _ = plain_checkpoint
    assert not [name for name in model.state_dict() if "intact" in name]
    assert len([name for name, _ in model.named_buffers() if "intact" in name]) == 2 * LAYERS


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.numerics
def test_round_trip_is_bit_exact_and_silent(checkpoint, caplog):
    model, out = checkpoint
    loaded, warnings = _load_warnings(out, caplog)

    assert not [w for w in warnings if "unexpected" in w.lower() or "missing" in w.lower()], warnings
    assert config_of(loaded) == config_of(model)
    _assert_same_prefix(loaded, model)


@pytest.mark.numerics
def test_loaded_checkpoint_applies_the_prefix_automatically(saved_checkpoint):
    model, out = saved_checkpoint
    loaded = load(out)
    tokenizer = load_tokenizer(out)
    batch = tokenizer(text_samples(2, 10), return_tensors="pt")

    with intact_kv_disabled(loaded):
        baseline = loaded(**batch).logits
    applied = loaded(**batch).logits

    # bit-identical weights and prefix, the same forward: the same sums in the same order
    assert torch.equal(applied, model(**batch).logits.cpu())
    # the prefix's effect: ten times what rounding could do
    assert beyond(relative_error(applied, baseline), 10 * two_forwards(loaded.config, batch["input_ids"].shape[1]))


def test_loading_info_is_passed_through(plain_checkpoint):
    model, out = plain_checkpoint
    loaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _assert_same_prefix(loaded, model)


@pytest.mark.numerics
def test_buffers_follow_the_model_dtype_and_save_in_the_stored_dtype(plain_checkpoint, tmp_path):
    model, out = plain_checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    stored = prefix_kv_of(model)
    for attention, key, value in zip(loaded.model.layers, stored.keys, stored.values):
        attention = attention.self_attn
        assert attention.intact_key.dtype == torch.bfloat16 == attention.q_proj.weight.dtype
        assert attention.intact_key.device == attention.q_proj.weight.device
        assert torch.equal(attention.intact_key, key.to(torch.bfloat16))
        assert torch.equal(attention.intact_value, value.to(torch.bfloat16))

    loaded.save_pretrained(tmp_path / "again")
    resaved = load_file(tmp_path / "again" / SIDE_FILE_PATH)[tensor_name(0, KEY_BUFFER)]
    assert resaved.dtype == torch.float32  # the block's dtype, which did not change
    assert torch.equal(resaved, stored.keys[0].to(torch.bfloat16).float())

    loaded.to(torch.float64)  # buffers move and cast with the module
    assert prefix_kv_of(loaded).keys[0].dtype == torch.float64


@pytest.mark.gpu
def test_buffers_sit_on_the_device_of_their_attention(plain_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model, out = plain_checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cuda")
    assert {t.device.type for t in prefix_kv_of(loaded).keys + prefix_kv_of(loaded).values} == {"cuda"}
    _assert_same_prefix(loaded.to("cpu"), model)


@pytest.mark.numerics
def test_resaving_a_loaded_checkpoint_keeps_the_block_and_the_side_file(saved_checkpoint, tmp_path):
    _, out = saved_checkpoint
    load(out).save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())[CONFIG_KEY]["prefix_token_ids"] == [BOS]
    original, resaved = load_file(out / SIDE_FILE_PATH), load_file(tmp_path / "again" / SIDE_FILE_PATH)
    assert original.keys() == resaved.keys()
    assert all(torch.equal(original[name], resaved[name]) for name in original)


def _other_model(tiny_model_dirs) -> torch.nn.Module:
    """Same shape as plain_checkpoint's model, other weights and so another prefix K/V."""
    model = load(tiny_model_dirs["llama"])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    attach_intact_kv(model, [BOS], capture_prefix_kv(model, [BOS]))
    return model


def test_saving_another_model_over_a_checkpoint_replaces_its_prefix(plain_checkpoint, tiny_model_dirs, tmp_path):
    _, out = plain_checkpoint
    target = tmp_path / "ckpt"
    shutil.copytree(out, target)
    other = _other_model(tiny_model_dirs)
    other.save_pretrained(target)
    _assert_same_prefix(load(target), other)


def test_a_side_file_from_another_checkpoint_is_refused(plain_checkpoint, tiny_model_dirs, tmp_path):
    _, out = plain_checkpoint
    other = tmp_path / "other"
    _other_model(tiny_model_dirs).save_pretrained(other)
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    shutil.copyfile(other / SIDE_FILE_PATH, mixed / SIDE_FILE_PATH)
    with pytest.raises(ValueError, match="is not the one saved with this config"):
        load(mixed)


@pytest.mark.parametrize("step", ["side file", "config block"])
def test_a_save_that_fails_half_way_leaves_a_folder_that_refuses_to_load(
    plain_checkpoint, tiny_model_dirs, tmp_path, monkeypatch, step
):
    """Saving model B over A's folder, the write of B's side file or sealed block breaks off half way."""
    _, out = plain_checkpoint
    target = tmp_path / "ckpt"
    shutil.copytree(out, target)
    other = _other_model(tiny_model_dirs)
    original = intactkv_modifier.checkpoint.folder.write_atomically
    failing = SIDE_FILE_PATH if step == "side file" else "config.json"

    def write_half(path: Path, data: bytes) -> None:
        if path == target / failing:
            original(path.with_name(path.name + ".half"), data[: len(data) // 2])
            raise OSError("disk full")
        original(path, data)

    monkeypatch.setattr(intactkv_modifier.checkpoint.folder, "write_atomically", write_half)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(target)
    with pytest.raises(ValueError, match="did not finish"):
        load(target)
    assert not list(target.rglob("*.tmp"))


def test_an_interrupted_write_leaves_no_temporary_file(plain_checkpoint, tmp_path, monkeypatch):
    _, out = plain_checkpoint
    target = tmp_path / "ckpt"
    shutil.copytree(out, target)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(intactkv_modifier.checkpoint.files.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        intactkv_modifier.checkpoint.files.write_atomically(target / SIDE_FILE_PATH, b"data")
    assert sorted(p.name for p in (target / SIDE_FILE_PATH).parent.iterdir()) == ["prefix_kv.safetensors"]


def test_saved_files_respect_the_umask(plain_checkpoint, tmp_path):
    model, _ = plain_checkpoint
    previous = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(previous)
    for name in ("config.json", SIDE_FILE_PATH):  # (transformers 5.17 itself writes model.safetensors 0600)
        assert (tmp_path / "ckpt" / name).stat().st_mode & 0o777 == 0o644, name


def test_checkpoint_from_the_hub_cache_loads_its_side_file(plain_checkpoint, tmp_path):
    """A hub id resolves to a snapshot folder; the side file comes from there, like the weights."""
    model, out = plain_checkpoint
    repo = tmp_path / "hub" / "models--intactkv-tests--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(out, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    loaded = AutoModelForCausalLM.from_pretrained(
        "intactkv-tests/tiny", cache_dir=tmp_path / "hub", local_files_only=True, dtype=torch.float32
    )
    _assert_same_prefix(loaded, model)


def test_checkpoint_of_the_older_layout_still_loads_and_resaves_into_the_side_file(plain_checkpoint, tmp_path):
    """Before the side file, the tensors sat in the weight files under the model's module path."""
    model, out = plain_checkpoint
    old = tmp_path / "old"
    (old).mkdir()
    document = json.loads((out / "config.json").read_text())
    del document[CONFIG_KEY]["side_file_sha256"]
    document[CONFIG_KEY]["format_version"] = 1  # the side file and its digest came later
    (old / "config.json").write_text(json.dumps(document))
    weights = {}
    for shard in out.glob("model-*.safetensors"):
        weights.update(load_file(shard))
    weights.update({f"model.{name}": tensor for name, tensor in load_file(out / SIDE_FILE_PATH).items()})
    save_file(weights, old / "model.safetensors", {"format": "pt"})
    assert prefix_tensors_in_weight_files(old) == ["model.safetensors"]

    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        loaded = load(old)
    finally:
        logger.remove(sink)
    _assert_same_prefix(loaded, model)
    assert len([m for m in messages if "keeps its prefix K/V in its weight files" in m]) == 1

    loaded.save_pretrained(tmp_path / "new")
    assert prefix_tensors_in_weight_files(tmp_path / "new") == []
    _assert_same_prefix(load(tmp_path / "new"), model)


# ---------------------------------------------------------------------------------------------- rejections


def _copy_with_config(out: Path, target: Path, edit) -> Path:
    shutil.copytree(out, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"num_key_value_heads": 4}, "does not belong to this model"),
        ({"prefix_token_ids": [BOS, 5]}, r"is \(2, 1, 32\) F32, but the config block declares \(2, 2, 32\)"),
        ({"format_version": 99}, "format_version 99"),
    ],
    ids=["other-geometry", "tensors-unlike-block", "unknown-format-version"],
)
def test_block_that_does_not_match_is_rejected(saved_checkpoint, tmp_path, edit, message):
    _, out = saved_checkpoint
    broken = _copy_with_config(out, tmp_path / "broken", lambda c: c[CONFIG_KEY].update(edit))
    with pytest.raises(ValueError, match=message):
        load(broken)


def test_checkpoint_without_its_side_file_is_rejected(saved_checkpoint, tmp_path):
    _, out = saved_checkpoint
    stripped = _copy_with_config(out, tmp_path / "stripped", lambda c: None)
    shutil.rmtree(stripped / "intactkv")
    missing = r"neither intactkv/prefix_kv.safetensors nor the weight files(.|\n)*Re-export"
    with pytest.raises(ValueError, match=missing):
        load(stripped)


def test_side_file_with_a_misshapen_or_missing_tensor_is_rejected(saved_checkpoint, tmp_path):
    _, out = saved_checkpoint
    broken = _copy_with_config(out, tmp_path / "broken", lambda c: None)
    tensors = load_file(out / SIDE_FILE_PATH)

    misshapen = {**tensors, tensor_name(1, KEY_BUFFER): torch.zeros(2, 3, 32)}
    save_file(misshapen, broken / SIDE_FILE_PATH)
    with pytest.raises(ValueError, match=r"`intact_key` of layer 1 .* is \(2, 3, 32\)(.|\n)*Re-export"):
        load(broken)

    save_file({n: t for n, t in tensors.items() if n != tensor_name(0, VALUE_BUFFER)}, broken / SIDE_FILE_PATH)
    with pytest.raises(ValueError, match=r"lacks the IntactKV tensor `intact_value` of layer 0(.|\n)*Re-export"):
        load(broken)


_FROM_HUB_CACHE = r"""
import json, sys
import torch
import intactkv_modifier
from intactkv_modifier import prefix_kv_of
from intactkv_modifier.checkpoint import HubAccess, checkpoint_folder, read_config_block
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
kv = prefix_kv_of(model)
torch.save({"keys": kv.keys, "values": kv.values}, sys.argv[2])
block = read_config_block(checkpoint_folder(sys.argv[1], HubAccess()))
print("RESULT " + json.dumps({"block": block.prefix_token_ids}))
"""


def _as_hub_cache(checkpoint: Path, cache: Path, repo_id: str) -> None:
    """The layout huggingface_hub gives a downloaded repository: refs/main names a snapshot holding every file."""
    revision = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(checkpoint, repo / "snapshots" / revision)


def test_hub_checkpoint_gets_its_side_file_from_the_snapshot(plain_checkpoint, tmp_path):
    """A hub id is resolved through the hub cache (offline here), side file included, by transformers and the plugin."""
    model, out = plain_checkpoint
    _as_hub_cache(out, tmp_path / "hub", "intactkv/tiny-llama")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    tensors = tmp_path / "prefix.pt"
    assert run_python(_FROM_HUB_CACHE, "intactkv/tiny-llama", str(tensors), env=env) == {"block": [BOS]}
    loaded, saved = torch.load(tensors), prefix_kv_of(model)
    for a, b in zip(saved.keys + saved.values, loaded["keys"] + loaded["values"]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- save wrapper


def test_a_deep_copy_saves_its_own_prefix(plain_checkpoint, tmp_path):
    model, _ = plain_checkpoint
    duplicate = copy.deepcopy(model)
    for attention in duplicate.model.layers:
        getattr(attention.self_attn, VALUE_BUFFER).mul_(3.0)
    duplicate.save_pretrained(tmp_path / "copy")
    _assert_same_prefix(load(tmp_path / "copy"), duplicate)


def test_llm_compressor_can_wrap_the_save_of_a_loaded_checkpoint(saved_checkpoint, tmp_path):
    """What ``oneshot`` does to a model loaded from an IntactKV checkpoint: its wrapper reads ``__self__``."""
    _, out = saved_checkpoint
    model = load(out)
    modify_save_pretrained(model)
    model.save_pretrained(tmp_path / "again")
    _assert_same_prefix(load(tmp_path / "again"), model)


class _FakeHub:
    """The two HfApi calls an upload makes, writing each committed file under ``root/<repo id>``."""

    def __init__(self, root: Path):
        self.root = root

    def create_repo(self, api, repo_id: str, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, api, repo_id: str, operations, **kwargs) -> None:
        for operation in operations:
            target = self.root / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(operation.path_or_fileobj, target)


def test_push_to_hub_uploads_the_side_file_and_the_sealed_block(plain_checkpoint, tmp_path, monkeypatch):
    model, _ = plain_checkpoint
    hub = _FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "create_commit", lambda api, repo_id, operations, **kw: hub.create_commit(
        api, repo_id, operations, **kw))
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/tiny-intactkv")
    uploaded = tmp_path / "hub" / "me" / "tiny-intactkv"
    for name in (SIDE_FILE_PATH, "README.md"):  # the card tells the hub page's readers that the prefix needs us
        assert (uploaded / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    _assert_same_prefix(load(uploaded), model)


def test_a_model_whose_layers_intactkv_cannot_find_does_not_load_plain(plain_checkpoint, monkeypatch):
    _, out = plain_checkpoint

    def unrecognised(model):
        raise TypeError("decoder layer 0 of Unknown has no `self_attn` module with layer_idx=0;")

    monkeypatch.setattr(intactkv_modifier.loading, "attention_modules", unrecognised)
    with pytest.raises(TypeError, match="declares IntactKV(.|\n)*remove `intactkv_config`"):
        load(out)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _save_and_die_at(step: str, model: torch.nn.Module, target: Path) -> None:
    """In a forked child: save ``model`` into ``target`` and be SIGKILLed at ``step`` (no cleanup code runs)."""
    folder, files = intactkv_modifier.checkpoint.folder, intactkv_modifier.checkpoint.files
    if step == "before removing the old side file":
        intactkv_modifier.storage.forget_prefix = lambda directory: _die()
    elif step == "after removing the old side file":
        forget = intactkv_modifier.storage.forget_prefix
        intactkv_modifier.storage.forget_prefix = lambda directory: (forget(directory), _die())
    elif step == "writing the weights":
        transformers.modeling_utils.safe_save_file = lambda *args, **kwargs: _die()
    elif step == "renaming the side file":
        files.os.replace = lambda source, destination: _die()
    elif step == "writing the sealed block":
        write = folder.write_atomically
        folder.write_atomically = lambda path, data: _die() if path.name == "config.json" else write(path, data)
    model.save_pretrained(target)


@pytest.mark.parametrize(
    "step",
    [
        "before removing the old side file",
        "after removing the old side file",
        "writing the weights",
        "renaming the side file",
        "writing the sealed block",
    ],
)
def test_a_save_killed_at_any_step_never_loads_wrong(plain_checkpoint, tiny_model_dirs, tmp_path, step):
    model, out = plain_checkpoint
    target = tmp_path / "ckpt"
    shutil.copytree(out, target)
    child = multiprocessing.get_context("fork").Process(
        target=_save_and_die_at, args=(step, _other_model(tiny_model_dirs), target)
    )
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    if step == "before removing the old side file":
        _assert_same_prefix(load(target), model)  # nothing was touched: A, whole
    elif step == "writing the weights":  # transformers had removed A's shards: it refuses first
        with pytest.raises(OSError, match="model-00001-of"):
            load(target)
    else:
        with pytest.raises(ValueError, match="did not finish"):
            load(target)
