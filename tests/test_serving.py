"""Serving with vLLM: the plugin's own logic, without vLLM.

Prefix matching, the cache slots of prefix positions, reading each backend's
cache arrangement back (against stores written here from vLLM's rules; vLLM's
real stores are in ``test_vllm_engine.py``), proving or refusing a layer's
prefix, reading real checkpoints saved by this package, and the plugin's
decision to add its connector.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import BOS, load, run_python

from intactkv_modifier import IntactKVConfig, attach_intact_kv, capture_prefix_kv, config_of
from intactkv_modifier.capture import PrefixKV
from intactkv_modifier.checkpoint import HubAccess, seal_prefix, tensor_name
from intactkv_modifier.config import CONFIG_KEY, KEY_BUFFER, VALUE_BUFFER
from intactkv_modifier.serving import (
    NO_BLOCK,
    SIDE_FILE_PATH,
    CpuAttentionLayout,
    KeysBesideValues,
    LayerPrefix,
    PackedSlots,
    PrefixLoad,
    UnverifiableCacheError,
    cache_codes,
    kv_head_slice,
    layer_index_of,
    layout_for,
    prefix_positions_to_load,
    prefix_tensors_in_weight_files,
    read_config_block,
    read_prefix,
    slot_indices,
)
from intactkv_modifier.serving.layer_prefix import CacheStore
from intactkv_modifier.serving.vllm_plugin import (
    ALLOW_PLAIN_ENV,
    CONNECTOR_CLASS,
    TURBOQUANT_CACHE_DTYPES,
    _local_folder,
    computes_whole_prompt,
    decide_connector,
    first_chunk_reads_step_kv,
)

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
    """``[PREFIX, HEADS, HEAD_DIM]`` keys and values, as the connector hands them to a cache store."""
    generator = torch.Generator().manual_seed(3)
    key = torch.randn(PREFIX, HEADS, HEAD_DIM, generator=generator).to(dtype)
    value = torch.randn(PREFIX, HEADS, HEAD_DIM, generator=generator).to(dtype)
    return key, value


def beside_store(cache: torch.Tensor) -> CacheStore:
    """What vLLM's GPU backends' ``do_kv_cache_update`` does: key and value side by side at [block, head, offset]."""
    block = cache.shape[2]

    def store(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        cache[slot_mapping // block, :, slot_mapping % block] = torch.cat([key, value], dim=-1).to(cache.dtype)

    return store


def layer_prefix(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, store: CacheStore, layout) -> LayerPrefix:
    return LayerPrefix("layers.0", cache, key, value, store, layout, key.to(cache.dtype), value.to(cache.dtype))


def test_kv_heads_follow_vllm_tensor_parallel_split():
    assert [kv_head_slice(4, rank, 2) for rank in range(2)] == [slice(0, 2), slice(2, 4)]
    assert [kv_head_slice(4, rank, 4) for rank in range(4)] == [slice(i, i + 1) for i in range(4)]
    # more ranks than KV heads: each head is replicated on consecutive ranks
    assert [kv_head_slice(2, rank, 8) for rank in range(8)] == [slice(r // 4, r // 4 + 1) for r in range(8)]
    for heads, size in ((4, 3), (3, 2), (2, 3)):
        with pytest.raises(ValueError, match="tensor-parallel"):
            kv_head_slice(heads, 0, size)


def test_kernel_blocks_split_scheduler_blocks_in_order():
    """Scheduler block 3 of 4 tokens is kernel blocks 6 and 7 of 2 tokens: slots 12, 13, 14, 15."""
    slots = slot_indices([PrefixLoad((3,), 0, 4)], block_size=4, kernel_block_size=2)
    assert slots.slot_mapping.tolist() == [12, 13, 14, 15] and slots.positions.tolist() == [0, 1, 2, 3]
    slots = slot_indices([PrefixLoad((7, 2, 5), 14, 18)], block_size=16, kernel_block_size=16)
    assert slots.slot_mapping.tolist() == [7 * 16 + 14, 7 * 16 + 15, 2 * 16, 2 * 16 + 1]


def test_positions_a_sliding_window_group_no_longer_holds_get_no_slot():
    """vLLM's hybrid manager gives a sliding-window group its null block for positions out of every window."""
    slots = slot_indices([PrefixLoad((NO_BLOCK, NO_BLOCK, 5), 0, 10, group=1)], block_size=4, kernel_block_size=2)
    assert slots.positions.tolist() == [8, 9] and slots.slot_mapping.tolist() == [5 * 4, 5 * 4 + 1]
    assert len(slot_indices([PrefixLoad((NO_BLOCK,), 0, 3)], 4, 4)) == 0


@pytest.mark.parametrize(("block_size", "kernel_block_size"), [(1, 1), (3, 3), (16, 16), (16, 8), (32, 16)])
def test_round_trip_through_the_paged_cache_is_bit_exact(block_size, kernel_block_size):
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
    assert len(slots) == 2 * PREFIX - hit and len(set(slots.slot_mapping.tolist())) == len(slots)
    cache = torch.full((pool * block_size // kernel_block_size, HEADS, kernel_block_size, 2 * HEAD_DIM), float("nan"))
    prefix = layer_prefix(cache, key, value, beside_store(cache), KeysBesideValues())
    prefix.write(slots)
    prefix.verify(slots)
    assert (~cache.isnan()).sum().item() == len(slots) * HEADS * 2 * HEAD_DIM  # nothing else touched


def test_a_layout_that_does_not_read_what_the_store_wrote_is_refused():
    key, value = stored_kv()
    cache = torch.zeros(4, HEADS, 16, 2 * HEAD_DIM)
    slots = slot_indices([PrefixLoad((1, 3, 0), 0, PREFIX)], 16, 16)
    prefix = layer_prefix(cache, key, value, beside_store(cache), CpuAttentionLayout("vec"))
    prefix.write(slots)
    with pytest.raises(UnverifiableCacheError, match="prefix keys read back from the cache .* are not the stored"):
        prefix.verify(slots)


def test_self_test_proves_the_layout_and_puts_the_blocks_back():
    key, value = stored_kv(torch.bfloat16)
    cache = torch.randn(4, HEADS, 16, 2 * HEAD_DIM).to(torch.bfloat16)
    before = cache.clone()
    slots = slot_indices([PrefixLoad((0, 1, 2), 0, PREFIX)], 16, 16)
    layer_prefix(cache, key, value, beside_store(cache), KeysBesideValues()).self_test(slots)
    assert torch.equal(cache, before)
    with pytest.raises(UnverifiableCacheError):
        layer_prefix(cache, key, value, beside_store(cache), CpuAttentionLayout("vec16")).self_test(slots)
    assert torch.equal(cache, before)  # put back even when the proof fails


def test_float32_prefix_is_compared_in_the_cache_dtype():
    key, value = stored_kv(torch.float32)
    cache = torch.zeros(4, HEADS, 16, 2 * HEAD_DIM, dtype=torch.bfloat16)
    slots = slot_indices([PrefixLoad((1, 3, 0), 0, PREFIX)], 16, 16)
    prefix = layer_prefix(cache, key, value, beside_store(cache), KeysBesideValues())
    prefix.write(slots)
    prefix.verify(slots)


def test_fp8_codes_may_round_either_way_but_no_further():
    """vLLM's CPU store rounds toward zero, torch to nearest: one code step apart is the same value, two are not."""
    key, value = stored_kv()
    expected = cache_codes(key, torch.float8_e4m3fn, 0.5)
    cache = torch.zeros(4, HEADS, 16, 2 * HEAD_DIM, dtype=torch.uint8)
    slots = slot_indices([PrefixLoad((0, 1, 2), 0, PREFIX)], 16, 16)

    def store_with_offset(step: int) -> CacheStore:
        def store(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
            codes = [cache_codes(t, torch.float8_e4m3fn, 0.5).view(torch.uint8) for t in (k, v)]
            magnitude = [(c & 0x7F).int() for c in codes]
            shifted = [((m - step).clamp(0, 0x7E) | (c & 0x80).int()).to(torch.uint8) for m, c in zip(magnitude, codes)]
            cache[slot_mapping // 16, :, slot_mapping % 16] = torch.cat(shifted, dim=-1)

        return store

    for step, accepted in ((0, True), (1, True), (2, False)):
        prefix = LayerPrefix("layers.0", cache, key, value, store_with_offset(step), KeysBesideValues(), expected,
                             cache_codes(value, torch.float8_e4m3fn, 0.5))
        prefix.write(slots)
        if accepted:
            prefix.verify(slots)
        else:
            with pytest.raises(UnverifiableCacheError, match="values differ"):
                prefix.verify(slots)


def _amx_store(cache: torch.Tensor) -> CacheStore:
    """vLLM's AMX ``reshape_and_cache`` (csrc/cpu/cpu_attn_amx.hpp) transcribed loop by loop, as flat indices.

    Keys: per (block, head), 32-bit words of two channels; 16 tokens per group; word ``j`` of a token at
    ``group * 16 * (D/2) + j * 16 + offset_in_group``. Values: pairs of tokens interleaved per channel; channel
    group ``i`` of 16 at ``i * block * 16``, token pair ``o // 2`` at ``(o // 2) * 32``, ``channel * 2 + o % 2``.
    """
    blocks, heads, block, twice_dim = cache.shape
    dim = twice_dim // 2
    flat = cache.view(blocks, heads, 2, block * dim)

    def store(key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        for token, slot in enumerate(slot_mapping.tolist()):
            number, offset = divmod(slot, block)
            for head in range(heads):
                group, in_group = divmod(offset, 16)
                for word in range(dim // 2):
                    base = 2 * (group * 16 * (dim // 2) + word * 16 + in_group)
                    flat[number, head, 0, base : base + 2] = key[token, head, 2 * word : 2 * word + 2]
                pair, in_pair = divmod(offset, 2)
                for channel in range(dim):
                    index = (channel // 16) * block * 16 + pair * 32 + (channel % 16) * 2 + in_pair
                    flat[number, head, 1, index] = value[token, head, channel]

    return store


def test_amx_layout_reads_what_vllms_amx_store_writes():
    """The AMX arrangement cannot run on this CPU; its reader is checked against the store's own index rule."""
    generator = torch.Generator().manual_seed(4)
    key, value = (torch.randn(PREFIX, HEADS, 32, generator=generator).to(torch.bfloat16) for _ in range(2))
    cache = torch.zeros(3, HEADS, 32, 64, dtype=torch.bfloat16)
    slots = slot_indices([PrefixLoad((2, 0), 0, PREFIX)], 32, 32)
    prefix = layer_prefix(cache, key, value, _amx_store(cache), CpuAttentionLayout("amx"))
    prefix.write(slots)
    prefix.verify(slots)
    with pytest.raises(UnverifiableCacheError):
        layer_prefix(cache, key, value, _amx_store(cache), CpuAttentionLayout("vec")).verify(slots)


def test_packed_slots_read_each_tokens_key_then_value_bytes_at_block_head_offset():
    """TurboQuant's arrangement: the kernels address ``cache.transpose(1, 2)`` by (block, offset, head)."""
    cache = torch.zeros(3, 2, 4, 8, dtype=torch.uint8)
    by_block_offset_head = cache.transpose(1, 2)
    slots = torch.tensor([5, 0, 11])
    for token, slot in enumerate(slots.tolist()):
        for head in range(2):
            by_block_offset_head[slot // 4, slot % 4, head] = torch.arange(8) + 16 * token + 64 * head
    keys, values = PackedSlots(key_bytes=3, value_bytes=4).read(cache, slots)
    assert keys.shape == (3, 2, 3) and values.shape == (3, 2, 4)
    assert keys[2, 1].tolist() == [96, 97, 98] and values[2, 1].tolist() == [99, 100, 101, 102]  # 16 * 2 + 64
    with pytest.raises(UnverifiableCacheError, match="byte-per-element"):
        PackedSlots(key_bytes=3, value_bytes=4).read(cache.to(torch.bfloat16), slots)
    with pytest.raises(UnverifiableCacheError, match="byte-per-element"):
        PackedSlots(key_bytes=6, value_bytes=4).read(cache, slots)  # slots smaller than the format's codes


def test_unknown_backends_and_instruction_sets_are_refused():
    assert isinstance(layout_for("FLASH_ATTN"), KeysBesideValues)
    assert isinstance(layout_for("CPU_ATTN", "vec16"), CpuAttentionLayout)
    for backend, isa in (("TURBOQUANT", None), ("CPU_ATTN", "neon"), ("CPU_ATTN", None), ("FLASHMLA", None)):
        with pytest.raises(UnverifiableCacheError, match="cannot read|did not say"):
            layout_for(backend, isa)
    with pytest.raises(UnverifiableCacheError, match="bfloat16 tile packing"):
        CpuAttentionLayout("amx").read(torch.zeros(2, 1, 32, 64, dtype=torch.uint8), torch.tensor([0]))


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
    for dtype in ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2", *TURBOQUANT_CACHE_DTYPES):
        assert decide(config, kv_cache_dtype=dtype).inject
    assert "as fp8 codes" in decide(config, kv_cache_dtype="fp8").message
    assert "skip_reading_prefix_cache=False" in decide(config, kv_cache_dtype="turboquant_k3v4_nc").message
    for overrides in ({"kv_connector": "NixlConnector"}, {"kv_offloading_size": 4.0}):
        decision = decide(config, **overrides)
        assert not decision.inject and decision.level == "WARNING" and "WITHOUT IntactKV" in decision.message
    assert not decide(config, kv_connector=CONNECTOR_CLASS).inject  # the user configured it already


@pytest.mark.parametrize(
    "dtype", ["int8_per_token_head", "int4_per_token_head", "fp8_per_token_head", "nvfp4", "ultraquant_4bit", "fp8_inc"]
)
def test_kv_cache_formats_that_cannot_be_verified_stop_vllm(saved, dtype):
    config, _, _ = saved
    with pytest.raises(ValueError, match=f"--kv-cache-dtype {dtype} keeps K/V in a format IntactKV cannot write"):
        decide(config, kv_cache_dtype=dtype)
    if dtype.endswith("_per_token_head"):
        with pytest.raises(ValueError, match="float32 scale per token and head"):
            decide(config, kv_cache_dtype=dtype)
    decision = decide(config, kv_cache_dtype=dtype, allow_plain=True)
    assert not decision.inject and decision.level == "WARNING" and "WITHOUT IntactKV" in decision.message
    assert not decide(None, kv_cache_dtype=dtype).inject  # other models: any format, as plain vLLM


def test_requests_that_skip_the_prefix_cache_compute_their_whole_prompt_and_others_load_the_prefix():
    class Sampling:
        def __init__(self, prompt_logprobs=None, skip_reading_prefix_cache=None):
            self.prompt_logprobs, self.skip_reading_prefix_cache = prompt_logprobs, skip_reading_prefix_cache

    assert not computes_whole_prompt(Sampling(), None)
    assert computes_whole_prompt(Sampling(prompt_logprobs=0), None)  # vLLM's SamplingParams sets skip for these
    assert computes_whole_prompt(Sampling(prompt_logprobs=0, skip_reading_prefix_cache=True), None)
    assert not computes_whole_prompt(Sampling(prompt_logprobs=0, skip_reading_prefix_cache=False), None)
    assert computes_whole_prompt(None, object())  # pooling
    assert all(first_chunk_reads_step_kv(dtype) for dtype in TURBOQUANT_CACHE_DTYPES)
    assert not any(first_chunk_reads_step_kv(dtype) for dtype in ("auto", "bfloat16", "fp8"))


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


# ------------------------------------------------------------------------------------ plugin: reading the model


def test_plugin_refuses_lora_on_an_intactkv_checkpoint(saved):
    config, _, _ = saved
    with pytest.raises(ValueError, match="LoRA is not supported on IntactKV checkpoints"):
        decide(config, enable_lora=True)
    assert not decide(None, enable_lora=True).inject  # other models: LoRA as usual


@pytest.mark.parametrize("source", ["s3://bucket/llama", "intactkv-tests/not-in-the-cache"], ids=["s3", "hub-offline"])
def test_plugin_stops_when_it_cannot_read_the_config(source, tmp_path, monkeypatch, caplog):
    """Unreadable is not "no IntactKV": the model may declare it, so vLLM must not silently serve it plain."""
    access = HubAccess(cache_dir=tmp_path, local_files_only=True)
    monkeypatch.delenv(ALLOW_PLAIN_ENV, raising=False)
    with pytest.raises(RuntimeError, match=f"cannot read config.json of {source}(.|\n)*{ALLOW_PLAIN_ENV}=1"):
        _local_folder(source, access)

    monkeypatch.setenv(ALLOW_PLAIN_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="vllm.intactkv"):
        assert _local_folder(source, access) is None
    assert len([r for r in caplog.records if "serving WITHOUT IntactKV" in r.getMessage()]) == 1


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
