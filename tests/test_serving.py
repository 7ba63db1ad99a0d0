"""Serving with vLLM: the plugin's own logic on the CPU, and vLLM itself where a GPU and vLLM exist.

The CPU tests need no vLLM: prefix matching, placing the prefix K/V into a
paged cache laid out as vLLM's connector API hands it over, reading a real
checkpoint saved by this package, and the plugin's decision to add its
connector. The GPU test compares vLLM's logprobs with and without the plugin
against transformers with and without IntactKV.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import entry_points
from pathlib import Path

import huggingface_hub
import pytest
import torch
from loguru import logger
from safetensors.torch import load_file, save_file
from tiny_models import BOS, load, run_python

from intactkv_modifier import IntactKVConfig, attach_intact_kv, capture_prefix_kv, config_of, intact_kv_disabled
from intactkv_modifier.capture import PrefixKV
from intactkv_modifier.checkpoint import HubAccess, seal_prefix, tensor_name
from intactkv_modifier.config import CONFIG_KEY, KEY_BUFFER, VALUE_BUFFER
from intactkv_modifier.serving import (
    SIDE_FILE_PATH,
    PrefixLoad,
    SlotIndices,
    kv_head_slice,
    layer_index_of,
    pack_layer,
    prefix_positions_to_load,
    prefix_tensors_in_weight_files,
    read_config_block,
    read_prefix,
    slot_indices,
    write_prefix,
)
from intactkv_modifier.serving.vllm_plugin import ALLOW_PLAIN_ENV, CONNECTOR_CLASS, _local_folder, decide_connector

# ---------------------------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("prompt", "computed", "expected"),
    [
        ([1, 9, 8, 7], 0, range(0, 2)),  # starts with the prefix: every prefix position
        ([1, 5, 8, 7], 0, range(0)),  # differs inside the prefix
        ([9, 1, 5, 6], 0, range(0)),  # prefix later in the prompt: its RoPE positions would be wrong
        ([1, 5], 0, range(0)),  # shorter than the prefix
        ([1, 9], 0, range(0, 1)),  # the bare prefix: its last token must be computed for logits
        ([1, 9, 8, 7], 1, range(1, 2)),  # a prefix-cache hit covers position 0
        ([1, 9, 8, 7], 2, range(0)),  # the cache already holds the whole prefix
        (None, 0, range(0)),  # prompt given as embeddings
    ],
)
def test_prefix_positions_to_load(prompt, computed, expected):
    num_tokens = 0 if prompt is None else len(prompt)
    assert prefix_positions_to_load(prompt, [1, 9], computed, num_tokens) == expected


def test_single_token_prefix_and_resumed_requests():
    assert prefix_positions_to_load([BOS], [BOS], 0, 1) == range(0)  # a bare [BOS] prompt: nothing to load
    assert prefix_positions_to_load([BOS, 5], [BOS], 0, 2) == range(0, 1)
    # a preempted request is resumed with its output tokens: the bare-prefix prompt now gets all of it
    assert prefix_positions_to_load([1, 9], [1, 9], 0, 5) == range(0, 2)


# ---------------------------------------------------------------------------------------------- paged layout

HEADS, HEAD_DIM, PREFIX = 4, 8, 37


def stored_kv(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    key = torch.randn(HEADS, PREFIX, HEAD_DIM, generator=generator).to(dtype)
    value = torch.randn(HEADS, PREFIX, HEAD_DIM, generator=generator).to(dtype)
    return key, value


def empty_cache(num_blocks: int, heads: int, block: int, physical: str, dtype: torch.dtype) -> torch.Tensor:
    """A NaN-filled cache as vLLM hands it to connectors: logical [blocks, H, block, 2D] over NHD or HND memory."""
    if physical == "NHD":
        return torch.full((num_blocks, block, heads, 2 * HEAD_DIM), float("nan"), dtype=dtype).permute(0, 2, 1, 3)
    return torch.full((num_blocks, heads, block, 2 * HEAD_DIM), float("nan"), dtype=dtype)


def read_back(cache: torch.Tensor, slots: SlotIndices) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[H, T, D]`` at ``slots``: the inverse of packing and writing."""
    key, value = cache[slots.blocks, :, slots.offsets].transpose(0, 1).chunk(2, dim=-1)
    return key, value


def test_kv_heads_follow_vllm_tensor_parallel_split():
    assert [kv_head_slice(4, rank, 2) for rank in range(2)] == [slice(0, 2), slice(2, 4)]
    assert [kv_head_slice(4, rank, 4) for rank in range(4)] == [slice(i, i + 1) for i in range(4)]
    # more ranks than KV heads: each head is replicated on consecutive ranks
    assert [kv_head_slice(2, rank, 8) for rank in range(8)] == [slice(r // 4, r // 4 + 1) for r in range(8)]
    for heads, size in ((4, 3), (3, 2), (2, 3)):
        with pytest.raises(ValueError, match="tensor-parallel"):
            kv_head_slice(heads, 0, size)


@pytest.mark.parametrize("physical", ["NHD", "HND"])
@pytest.mark.parametrize(("block_size", "kernel_block_size"), [(1, 1), (3, 3), (16, 16), (16, 8), (32, 16)])
@pytest.mark.parametrize("tp_size", [1, 2, 4, 8])
def test_round_trip_through_the_paged_cache_is_bit_exact(physical, block_size, kernel_block_size, tp_size):
    key, value = stored_kv()
    blocks_per_request = -(-PREFIX // block_size)
    pool = 2 * blocks_per_request + 3
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(block_size)).tolist()
    hit = min(2 * block_size, PREFIX - 1)  # the second request found its first positions in the prefix cache
    loads = [
        PrefixLoad(tuple(order[:blocks_per_request]), 0, PREFIX),
        PrefixLoad(tuple(order[blocks_per_request : 2 * blocks_per_request]), hit, PREFIX),
    ]
    slots = slot_indices(loads, block_size, kernel_block_size)
    assert len(slots) == 2 * PREFIX - hit

    rank_heads = []
    for rank in range(tp_size):
        heads = kv_head_slice(HEADS, rank, tp_size)
        cache = empty_cache(pool * block_size // kernel_block_size, heads.stop - heads.start, kernel_block_size,
                            physical, torch.float32)
        write_prefix(cache, pack_layer(key, value, heads), slots)

        got_key, got_value = read_back(cache, slots)
        positions = slots.positions
        assert torch.equal(got_key, key[heads][:, positions]) and torch.equal(got_value, value[heads][:, positions])
        written = (~cache.isnan()).sum().item()
        assert written == len(slots) * (heads.stop - heads.start) * 2 * HEAD_DIM  # nothing else touched
        rank_heads.append((heads, got_key, got_value))

    distinct = {(h.start, h.stop): (k, v) for h, k, v in rank_heads}
    full_key = torch.cat([distinct[s][0] for s in sorted(distinct)])
    full_value = torch.cat([distinct[s][1] for s in sorted(distinct)])
    assert torch.equal(full_key, key[:, slots.positions]) and torch.equal(full_value, value[:, slots.positions])


def test_layout_is_keys_then_values_per_token_and_head():
    """Pin the memory layout itself: an NHD cache holds token t of head h at [block, offset, h, :D | D:]."""
    key, value = stored_kv()
    raw = torch.zeros(10, 16, HEADS, 2 * HEAD_DIM)
    slots = slot_indices([PrefixLoad((7, 2, 5), 0, PREFIX)], block_size=16, kernel_block_size=16)
    write_prefix(raw.permute(0, 2, 1, 3), pack_layer(key, value, slice(0, HEADS)), slots)
    for position, (block, offset) in {0: (7, 0), 15: (7, 15), 16: (2, 0), 36: (5, 4)}.items():
        for head in range(HEADS):
            assert torch.equal(raw[block, offset, head, :HEAD_DIM], key[head, position])
            assert torch.equal(raw[block, offset, head, HEAD_DIM:], value[head, position])


def test_kernel_blocks_split_scheduler_blocks_in_order():
    slots = slot_indices([PrefixLoad((3,), 0, 4)], block_size=4, kernel_block_size=2)
    assert slots.blocks.tolist() == [6, 6, 7, 7] and slots.offsets.tolist() == [0, 1, 0, 1]


def test_float32_prefix_is_cast_to_the_cache_dtype():
    key, value = stored_kv(torch.float32)
    cache = empty_cache(4, HEADS, 16, "HND", torch.bfloat16)
    slots = slot_indices([PrefixLoad((1, 3, 0), 0, PREFIX)], 16, 16)
    write_prefix(cache, pack_layer(key, value, slice(0, HEADS)), slots)
    got_key, got_value = read_back(cache, slots)
    assert torch.equal(got_key, key.to(torch.bfloat16)) and torch.equal(got_value, value.to(torch.bfloat16))


def test_layout_and_block_errors_are_explicit():
    key, value = stored_kv()
    packed = pack_layer(key, value, slice(0, HEADS))
    slots = slot_indices([PrefixLoad((0, 1, 2), 0, PREFIX)], 16, 16)
    with pytest.raises(ValueError, match="not supported by IntactKV serving"):
        write_prefix(torch.zeros(2, 3, 16, HEADS, HEAD_DIM), packed, slots)  # vLLM's older [2, B, N, H, D] layout
    with pytest.raises(ValueError, match="need 3 KV blocks, the request has 2"):
        slot_indices([PrefixLoad((0, 1), 0, PREFIX)], 16, 16)
    with pytest.raises(ValueError, match="not a multiple"):
        slot_indices([PrefixLoad((0, 1, 2), 0, PREFIX)], 16, 6)


def test_layer_index_of_vllm_layer_names():
    assert layer_index_of("model.layers.7.self_attn.attn") == 7
    assert layer_index_of("language_model.model.layers.12.self_attn.attn") == 12
    with pytest.raises(ValueError, match="decoder layer"):
        layer_index_of("lm_head")


# ---------------------------------------------------------------------------------------------- checkpoints


def prefix_tensors(kv: PrefixKV, module_path: str = "") -> dict[str, torch.Tensor]:
    """The prefix K/V as the side file names them, or with ``module_path="model."`` as older weight files did."""
    names = {}
    for layer, (key, value) in enumerate(zip(kv.keys, kv.values)):
        names[module_path + tensor_name(layer, KEY_BUFFER)] = key.contiguous()
        names[module_path + tensor_name(layer, VALUE_BUFFER)] = value.contiguous()
    return names


def lay_out(saved_dir: Path, kv: PrefixKV, directory: Path, *, sidecar: bool) -> Path:
    """A copy of a saved checkpoint with the prefix K/V either in SIDE_FILE_PATH or in model.safetensors.

    Built from the saved weights and ``kv``, so each layout is exactly what the test says; the older
    layout comes with the version 1 block it was written with.
    """
    directory.mkdir(parents=True, exist_ok=True)
    document = json.loads((saved_dir / "config.json").read_text())
    block = IntactKVConfig.from_config_value(document[CONFIG_KEY])
    if not sidecar:
        document[CONFIG_KEY] = {**block.unsealed().to_config_value(), "format_version": 1}
    (directory / "config.json").write_text(json.dumps(document))
    weights = load_file(saved_dir / "model.safetensors")
    if sidecar:
        seal_prefix(directory, block, kv.keys, kv.values)
    else:
        weights.update(prefix_tensors(kv, module_path="model."))
    save_file(weights, directory / "model.safetensors", {"format": "pt"})
    return directory


@pytest.fixture(scope="module", params=[("llama", [BOS]), ("qwen2", [11, 12, 13])], ids=["llama-bos", "qwen2-3tok"])
def saved(request, tiny_model_dirs, tmp_path_factory) -> tuple[IntactKVConfig, PrefixKV, Path]:
    """A checkpoint written by this package: FP prefix K/V captured, attached and saved with the model."""
    architecture, prefix = request.param
    model = load(tiny_model_dirs[architecture])
    kv = capture_prefix_kv(model, prefix)
    attach_intact_kv(model, prefix, kv)
    out = tmp_path_factory.mktemp("serving") / architecture
    model.save_pretrained(out)
    return config_of(model), kv, out


def test_config_block_and_tensors_of_a_saved_checkpoint(saved):
    """What this package saves is what vLLM can load: the prefix only in the side file."""
    config, kv, out = saved
    assert read_config_block(out).unsealed() == config and read_config_block(out).side_file_sha256 is not None
    assert prefix_tensors_in_weight_files(out) == []
    stored = read_prefix(out)
    assert stored.config.unsealed() == config and stored.source == out / SIDE_FILE_PATH
    for a, b in zip(kv.keys + kv.values, stored.keys + stored.values):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_sidecar_is_read_and_keeps_weight_files_clean(saved, tmp_path):
    config, kv, out = saved
    copy = lay_out(out, kv, tmp_path / "ckpt", sidecar=True)
    assert prefix_tensors_in_weight_files(copy) == []
    stored = read_prefix(copy)
    assert stored.source == copy / SIDE_FILE_PATH and stored.config.unsealed() == config
    for a, b in zip(kv.keys + kv.values, stored.keys + stored.values):
        assert torch.equal(a, b)


def test_prefix_in_weight_files_is_what_vllm_rejects(saved, tmp_path):
    """Prefix tensors in model.safetensors are unknown parameters to vLLM: reported, still readable."""
    _, kv, out = saved
    copy = lay_out(out, kv, tmp_path / "old", sidecar=False)
    assert prefix_tensors_in_weight_files(copy) == ["model.safetensors"]
    stored = read_prefix(copy)
    assert stored.source == copy and all(torch.equal(a, b) for a, b in zip(kv.keys, stored.keys))


def test_weight_files_outside_the_index_are_not_vllms(saved, tmp_path):
    """With an index, vLLM loads only the files it names; a stray top-level file is not a weight file."""
    _, kv, out = saved
    copy = tmp_path / "sharded"
    copy.mkdir()
    (copy / "config.json").write_bytes((out / "config.json").read_bytes())
    weights = load_file(out / "model.safetensors")
    save_file(weights, copy / "model-00001-of-00001.safetensors")
    save_file(prefix_tensors(kv, module_path="model."), copy / "stray.safetensors")
    index = {"weight_map": dict.fromkeys(weights, "model-00001-of-00001.safetensors")}
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert prefix_tensors_in_weight_files(copy) == []
    with pytest.raises(ValueError, match="neither"):
        read_prefix(copy)


def test_checkpoint_without_block_reads_as_none(tiny_model_dirs):
    assert read_config_block(tiny_model_dirs["llama"]) is None
    assert read_prefix(tiny_model_dirs["llama"]) is None


def test_bad_checkpoints_fail_with_the_reason(saved, tmp_path):
    config, kv, out = saved
    copy = lay_out(out, kv, tmp_path / "bad", sidecar=True)
    tensors = prefix_tensors(kv)
    block = read_config_block(copy).to_config_value()

    (copy / "config.json").write_text(json.dumps({"intactkv_config": {**block, "format_version": 99}}))
    with pytest.raises(ValueError, match="Upgrade intactkv-modifier"):
        read_config_block(copy)

    (copy / "config.json").write_text(json.dumps({"intactkv_config": {**block, "prefix_token_ids": [BOS, 5, 6, 7]}}))
    with pytest.raises(ValueError, match="do not match their config"):
        read_prefix(copy)

    (copy / "config.json").write_text(json.dumps({"intactkv_config": config.to_config_value()}))
    with pytest.raises(ValueError, match="has no side_file_sha256, so the save that wrote it did not finish"):
        read_prefix(copy)

    version_1 = {**config.to_config_value(), "format_version": 1}
    (copy / "config.json").write_text(json.dumps({"intactkv_config": version_1}))
    with pytest.raises(ValueError, match="would skip its digest check"):
        read_prefix(copy)

    (copy / "config.json").write_text(json.dumps({"intactkv_config": block}))
    save_file({n: t for n, t in tensors.items() if not n.startswith("layers.1.")}, copy / SIDE_FILE_PATH)
    with pytest.raises(ValueError, match="lacks the IntactKV tensor `intact_key` of layer 1"):
        read_prefix(copy)

    nan = [torch.full_like(t, float("nan")) for t in kv.keys]
    seal_prefix(copy, config, nan, kv.values)
    with pytest.raises(ValueError, match="non-finite"):
        read_prefix(copy)


# ---------------------------------------------------------------------------------------------- plugin decision


def decide(block: IntactKVConfig | None, **overrides):
    settings = dict(model="m", block=block, kv_cache_dtype="auto", kv_connector=None, kv_offloading_size=None)
    return decide_connector(**{**settings, **overrides})


def test_plugin_leaves_models_without_the_block_alone():
    decision = decide(None)
    assert not decision.inject and decision.level == "DEBUG"


def test_plugin_adds_its_connector_only_where_it_can_be_honoured(saved):
    config, _, _ = saved
    assert decide(config).inject
    assert decide(config, kv_cache_dtype="bfloat16").inject
    for overrides in ({"kv_cache_dtype": "fp8"}, {"kv_connector": "NixlConnector"}, {"kv_offloading_size": 4.0}):
        decision = decide(config, **overrides)
        assert not decision.inject and decision.level == "WARNING" and "WITHOUT IntactKV" in decision.message
    assert not decide(config, kv_connector=CONNECTOR_CLASS).inject  # the user configured it already


def test_plugin_says_vllm_does_not_apply_the_checkpoints_kv_cache_quantization(saved):
    config, _, _ = saved
    decision = decide(config.model_copy(update={"kv_cache": {"residual_length": 32}}))
    assert decision.inject and decision.level == "WARNING" and "`kv_cache` quantization" in decision.message
    assert decide(config).level == "INFO"


_IMPORT_WATCH = r"""
import importlib.abc, json, sys
attempts = []

class Watch(importlib.abc.MetaPathFinder):
    # records every attempt to import vLLM, installed or not, and makes it fail
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            attempts.append(name)
            raise ImportError(f"{name} is watched")
        return None

sys.meta_path.insert(0, Watch())
import intactkv_modifier.serving.vllm_plugin as plugin
on_import = list(attempts)
try:
    plugin.register()  # needs vLLM: proves the watch sees an import
except ImportError:
    pass
print("RESULT " + json.dumps({"on_import": on_import, "on_register": attempts}))
"""


def test_importing_the_plugin_does_not_import_vllm():
    report = run_python(_IMPORT_WATCH)
    assert report["on_import"] == [] and report["on_register"][:1] == ["vllm"]


_SERVING_ONLY = r"""
import json, sys
sys.modules["llmcompressor"] = None  # as in a vLLM environment: llm-compressor is not installed
import torch
import intactkv_modifier
from intactkv_modifier.checkpoint import read_prefix
from intactkv_modifier.serving.vllm_plugin import decide_connector

stored = read_prefix(sys.argv[1])
decision = decide_connector(model=sys.argv[1], block=stored.config, kv_cache_dtype="auto", kv_connector=None,
                            kv_offloading_size=None)
torch.save({"keys": stored.keys, "values": stored.values}, sys.argv[2])
try:
    from intactkv_modifier import IntactKVModifier
    modifier_error = None
except ImportError as error:
    modifier_error = str(error)
print("RESULT " + json.dumps({
    "available": intactkv_modifier.QUANTIZATION_AVAILABLE,
    "llmcompressor_loaded": sys.modules.get("llmcompressor") is not None,
    "block": stored.config.model_dump(mode="json"),
    "inject": decision.inject,
    "modifier_error": modifier_error,
}))
"""


def test_plugin_reads_checkpoints_without_llmcompressor(saved, tmp_path):
    """vLLM pins another compressed-tensors than llm-compressor, so its environment has no llm-compressor."""
    config, kv, out = saved
    tensors = tmp_path / "prefix.pt"
    report = run_python(_SERVING_ONLY, str(out), str(tensors))
    assert not report["available"] and not report["llmcompressor_loaded"]
    assert IntactKVConfig.model_validate(report["block"]).unsealed() == config and report["inject"]
    assert "pip install 'intactkv-modifier[quantize]'" in report["modifier_error"]
    read_back = torch.load(tensors)
    for a, b in zip(kv.keys + kv.values, read_back["keys"] + read_back["values"]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- vLLM, on a GPU

_VLLM_RUN = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

model, prompts = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(
    model=model, dtype="bfloat16", max_model_len=64, gpu_memory_utilization=0.25, enforce_eager=True, seed=0,
    skip_tokenizer_init=True,
)
params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5, detokenize=False)
runs = []
for _ in range(2):  # the second pass is served from vLLM's prefix cache
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    runs.append([{str(t): lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in outputs])
print("RESULT " + json.dumps(runs))
"""


def _vllm_logprobs(model_dir: Path, prompts: list[list[int]], with_plugin: bool) -> list[list[dict[int, float]]]:
    env = dict(os.environ)
    if not with_plugin:
        env["VLLM_PLUGINS"] = ""  # vLLM's allow-list: load no general plugin
    runs = run_python(_VLLM_RUN, str(model_dir), json.dumps(prompts), env=env, timeout=900)
    return [[{int(t): lp for t, lp in out.items()} for out in run] for run in runs]


@pytest.mark.gpu
def test_vllm_uses_the_stored_prefix_exactly_where_transformers_does(tiny_model_dirs, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("vllm")
    if not any(ep.value.startswith("intactkv_modifier.") for ep in entry_points(group="vllm.general_plugins")):
        pytest.skip("intactkv-modifier is not installed with its vllm.general_plugins entry point")

    model = load(tiny_model_dirs["llama"])
    kv = capture_prefix_kv(model, [BOS])
    # Shift the stored values so that using them, or not, changes the output far beyond bf16 noise
    # (on the CPU: ~0.9 against 0.005 between float32 and bfloat16).
    shifted = PrefixKV(keys=kv.keys, values=[v + 2.0 * torch.randn_like(v) for v in kv.values])
    attach_intact_kv(model, [BOS], shifted)
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)  # as saved: prefix in the side file, none in the weights vLLM loads

    generator = torch.Generator().manual_seed(5)
    words = [torch.randint(4, 124, (19,), generator=generator).tolist() for _ in range(6)]
    prompts = [[BOS, *w] for w in words] + [w[:1] + [BOS] + w[1:] for w in words[:2]]
    reference = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        intact = [reference(torch.tensor([p])).logits[0, -1].float().log_softmax(-1) for p in prompts]
        with intact_kv_disabled(reference):
            plain = [reference(torch.tensor([p])).logits[0, -1].float().log_softmax(-1) for p in prompts]

    shift = max(float((a - b)[a.topk(5).indices].abs().max()) for a, b in zip(intact[:6], plain[:6]))
    assert shift > 0.5  # 10x the tolerance below: matching `intact`, not `plain`, proves vLLM used the stored K/V
    for with_plugin, expected in ((True, intact), (False, plain)):
        # both passes: computed afresh, then from vLLM's prefix cache (the first 16-token block)
        for run in _vllm_logprobs(checkpoint, prompts, with_plugin):
            for got, want in zip(run, expected):
                for token, logprob in got.items():
                    assert abs(logprob - float(want[token])) < 0.05, (with_plugin, token, logprob, float(want[token]))


# ------------------------------------------------------------------------------------ plugin: reading the model


def test_plugin_refuses_lora_on_an_intactkv_checkpoint(saved):
    config, _, _ = saved
    with pytest.raises(ValueError, match="LoRA is not supported on IntactKV checkpoints"):
        decide(config, enable_lora=True)
    assert not decide(None, enable_lora=True).inject  # other models: LoRA as usual


@pytest.mark.parametrize("source", ["s3://bucket/llama", "intactkv-tests/not-in-the-cache"], ids=["s3", "hub-offline"])
def test_plugin_stops_when_it_cannot_read_the_config(source, tmp_path, monkeypatch):
    """Unreadable is not "no IntactKV": the model may declare it, so vLLM must not silently serve it plain."""
    access = HubAccess(cache_dir=tmp_path, local_files_only=True)
    monkeypatch.delenv(ALLOW_PLAIN_ENV, raising=False)
    with pytest.raises(RuntimeError, match=f"cannot read config.json of {source}(.|\n)*{ALLOW_PLAIN_ENV}=1"):
        _local_folder(source, access)

    monkeypatch.setenv(ALLOW_PLAIN_ENV, "1")
    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        assert _local_folder(source, access) is None
    finally:
        logger.remove(sink)
    assert len([m for m in messages if "serving WITHOUT IntactKV" in m]) == 1


def test_plugin_reads_the_hub_with_the_engines_token_revision_and_download_dir(saved, tmp_path, monkeypatch):
    _, _, out = saved
    calls: list[tuple[str, dict]] = []

    def download(repo_id: str, filename: str, **kwargs) -> str:
        calls.append((filename, kwargs))
        return str(out / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    access = HubAccess(revision="v2", token="hf_secret", cache_dir=tmp_path / "downloads")
    assert _local_folder("owner/gated-model", access) == out
    assert [name for name, _ in calls] == ["config.json", SIDE_FILE_PATH]
    for _, kwargs in calls:
        assert (kwargs["revision"], kwargs["token"], kwargs["cache_dir"]) == ("v2", "hf_secret", tmp_path / "downloads")
