"""Quantized KV cache: error bounds, exact bytes, the FP prefix, and generate() like the FP cache."""

from __future__ import annotations

import math

import pytest
import torch
from cpu_compile import needs_vectorizing_cpu_compiler
from tiny_models import BOS, left_pad, load, load_tokenizer, text_samples
from tolerances import EPS32, beyond, code_step, within
from transformers import DynamicCache

from intactkv_modifier import PrefixKV, attach_intact_kv, capture_prefix_kv
from intactkv_modifier.architecture import attention_modules, kv_geometry
from intactkv_modifier.config import KEY_BUFFER, VALUE_BUFFER
from intactkv_modifier.kv_quant import (
    KeyFavoredQuantizedCache,
    KVQuantSettings,
    TensorQuantSettings,
    dequantize,
    full_precision_bytes_per_token,
    install_kv_quantization,
    kv_quantization_of,
    quantize,
    quantized_bytes_per_token,
    remove_kv_quantization,
    storage,
)
from intactkv_modifier.kv_quant.packing import pack, unpack
from intactkv_modifier.kv_quant.stream import quantizable_tokens
from intactkv_modifier.kv_readout import model_kv_for_prefix

pytestmark = pytest.mark.numerics  # CI runs these under other CPU kernels and thread counts too

BITS = (2, 3, 4, 8)
GRANULARITIES = ("per_channel", "per_token")
#: small groups and window so that a 30-token prompt already quantizes most of its KV
SMALL = dict(group_size=8, residual_length=4)


def _per_element(statistic: torch.Tensor, settings: TensorQuantSettings) -> torch.Tensor:
    """A per-group scale or minimum repeated onto the elements of its group."""
    axis = -1 if settings.granularity == "per_token" else 2
    return statistic.repeat_interleave(settings.group_size, dim=axis)


def _per_group(tensor: torch.Tensor, settings: TensorQuantSettings, reduce) -> torch.Tensor:
    if settings.granularity == "per_token":
        return reduce(tensor.unflatten(-1, (-1, settings.group_size)), dim=-1)
    return reduce(tensor.unflatten(2, (-1, settings.group_size)), dim=3)


def _outlier_channels(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random K/V-like states whose channels span three orders of magnitude, plus an offset."""
    scales = torch.logspace(-2, 1, shape[-1])
    return (torch.randn(*shape) * scales + 0.5).to(dtype)


def _half_a_step_and_rounding(states: torch.Tensor, quantized, settings: TensorQuantSettings) -> torch.Tensor:
    """Per element: half a step, plus the float32 roundings of ``(x - min) / scale`` (two, ``eps |x - min|``), of
    ``code * scale`` and ``min + code * scale`` (one each, of their size), then one to the states' dtype."""
    scale = _per_element(quantized.scale, settings).float()
    minimum = _per_element(quantized.minimum, settings).float()
    x = states.float()
    bound = scale / 2 + EPS32 * (2 * (x - minimum).abs() + x.abs() + scale)
    if states.dtype != torch.float32:
        bound += torch.finfo(states.dtype).eps / 2 * (x.abs() + scale)
    return bound


def _prompts(tokenizer, lengths: tuple[int, ...]) -> list[list[int]]:
    texts = text_samples(len(lengths), max(lengths))
    return [[BOS] + tokenizer(t, add_special_tokens=False)["input_ids"][:n] for t, n in zip(texts, lengths)]


# quantizer and packing -----------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("bits", BITS)
def test_dequantization_error_is_within_half_a_step(bits, granularity):
    settings = TensorQuantSettings(bits=bits, granularity=granularity, group_size=16)
    states = _outlier_channels(2, 3, 48, 32)
    quantized = quantize(states, settings)

    error = (dequantize(quantized) - states).abs()

    assert (error <= _half_a_step_and_rounding(states, quantized, settings)).all()
    # and the bound is not bought with a loose scale: every group uses its lowest and its highest code
    codes = unpack(quantized.codes, bits)
    assert (_per_group(codes, settings, torch.amin) == 0).all()
    assert (_per_group(codes, settings, torch.amax) == 2**bits - 1).all()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_bfloat16_error_is_half_a_step_plus_output_rounding(granularity):
    """Scales rounded to bfloat16 are rounded up, so even the top code of 8 bits still reaches the maximum."""
    settings = TensorQuantSettings(bits=8, granularity=granularity, group_size=16)
    states = _outlier_channels(2, 2, 64, 32, dtype=torch.bfloat16)
    quantized = quantize(states, settings)
    assert quantized.scale.dtype == torch.bfloat16 and quantized.minimum.dtype == torch.bfloat16

    error = (dequantize(quantized).float() - states.float()).abs()
    assert (error <= _half_a_step_and_rounding(states, quantized, settings)).all()


def test_constant_groups_dequantize_exactly():
    settings = TensorQuantSettings(bits=2, granularity="per_token", group_size=8)
    states = torch.full((1, 1, 3, 16), 0.375)
    assert torch.equal(dequantize(quantize(states, settings)), states)


@pytest.mark.parametrize("bits", BITS)
def test_packing_round_trips_with_no_wasted_bit(bits):
    codes = torch.randint(0, 2**bits, (3, 4, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 4, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


@needs_vectorizing_cpu_compiler
@pytest.mark.parametrize("bits", (2, 4))
def test_compiled_unpacking_takes_the_element_wise_form_and_gives_the_same_codes(bits):
    """Under torch.compile one-byte units unpack by a broadcast shift (fusible), eagerly by widening words."""
    codes = torch.randint(0, 2**bits, (3, 4, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert torch.equal(torch.compile(unpack, fullgraph=True, dynamic=False)(packed, bits), codes)


def test_three_bit_units_hold_eight_codes_in_three_bytes_least_significant_first():
    codes = [1, 2, 3, 4, 5, 6, 7, 0]
    word = sum(code << (3 * i) for i, code in enumerate(codes))
    packed = pack(torch.tensor([codes], dtype=torch.uint8), 3)
    assert packed.tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("bits", BITS)
def test_packed_bytes_equal_the_formula(bits, granularity, dtype):
    batch, heads, tokens, head_dim = 3, 2, 96, 64
    settings = TensorQuantSettings(bits=bits, granularity=granularity, group_size=32)
    quantized = quantize(torch.randn(batch, heads, tokens, head_dim, dtype=dtype), settings)

    per_token = quantized_bytes_per_token(settings, heads, head_dim, dtype)

    assert quantized.nbytes == batch * tokens * per_token
    assert per_token < full_precision_bytes_per_token(heads, head_dim, dtype)


# the cache -----------------------------------------------------------------------


def test_cache_bytes_equal_the_formula_and_shrink(tiny_model_dirs, monkeypatch):
    """Every row: FP prefix and residual at FP size, the rest at the packed size; far below a DynamicCache.

    With no room reserved ahead (the growth policy is tested in test_kv_storage), the bytes held are exactly these.
    """
    monkeypatch.setattr(storage, "GROWTH", 0.0)
    monkeypatch.setattr(storage, "MIN_ROOM_TOKENS", 0)
    model = load(tiny_model_dirs["llama"])
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    settings = KVQuantSettings.from_bits(4, 2, **SMALL)
    hook = install_kv_quantization(model, settings, full_precision_prefix=1)
    rows = _prompts(tokenizer, (9, 30))
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    generated = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
        return_dict_in_generate=True,
    )
    cache = generated.past_key_values
    geometry = kv_geometry(model.config)
    heads, head_dim = geometry.num_key_value_heads, geometry.head_dim
    fp_bytes = full_precision_bytes_per_token(heads, head_dim, torch.float32)
    length = cache.get_seq_length()

    expected = 0
    for layer in cache.layers:
        counts = layer.quantized_tokens()
        for name, tensor_settings in (("keys", layer.key_settings), ("values", layer.value_settings)):
            for row, fp_length in enumerate(cache.full_precision_lengths(len(rows))):
                block = math.lcm(layer.key_settings.token_block, layer.value_settings.token_block)
                quantized = quantizable_tokens(length - fp_length, settings.residual_length, block)
                assert counts[name][row] == quantized > 0
                packed = quantized_bytes_per_token(tensor_settings, heads, head_dim, torch.float32)
                expected += (length - quantized) * fp_bytes + quantized * packed
    assert cache.nbytes == expected

    hook.remove()
    plain = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
        return_dict_in_generate=True,
    ).past_key_values
    plain_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in plain.layers)
    assert plain_bytes == 2 * len(rows) * length * fp_bytes * geometry.num_layers
    assert cache.nbytes < 0.65 * plain_bytes  # short rows, 8-element groups and 21 FP pad slots: far from the asymptote


def _scaled(kv: PrefixKV, factor: float) -> PrefixKV:
    return PrefixKV(keys=[k * factor for k in kv.keys], values=[v * factor for v in kv.values])


@pytest.mark.parametrize("keep_prefix", [True, False])
def test_intact_prefix_is_bit_exact_inside_the_quantized_cache(tiny_model_dirs, keep_prefix):
    """The spliced FP prefix KV survives prefill and decoding untouched, at each row's own start."""
    model = load(tiny_model_dirs["llama"])
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    attach_intact_kv(model, [BOS], _scaled(capture_prefix_kv(model, [BOS]), 2.0))
    install_kv_quantization(model, KVQuantSettings.from_bits(2, 2, group_size=8, residual_length=0),
                            full_precision_prefix=None if keep_prefix else 0)
    ids, mask = left_pad(_prompts(tokenizer, (4, 11)), tokenizer.pad_token_id)

    cache = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
        return_dict_in_generate=True,
    ).past_key_values

    assert isinstance(cache, KeyFavoredQuantizedCache)
    assert cache.left_padding == [7, 0]
    assert cache.full_precision_prefix == (1 if keep_prefix else 0)
    for layer, attention in zip(cache.layers, attention_modules(model)):
        keys, values = layer.read()
        assert min(layer.quantized_tokens()["keys"]) > 0
        for row, start in enumerate(cache.left_padding):
            stored = (keys[row, :, start], values[row, :, start])
            intact = (getattr(attention, KEY_BUFFER)[:, 0], getattr(attention, VALUE_BUFFER)[:, 0])
            assert all(torch.equal(s, i) for s, i in zip(stored, intact)) == keep_prefix


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
def test_left_padded_batch_generates_like_unbatched(tiny_model_dirs, architecture):
    """Each row's quantization blocks start at its own first token, so padding and batch-mates do not matter."""
    model = load(tiny_model_dirs[architecture])
    tokenizer = load_tokenizer(tiny_model_dirs[architecture])
    install_kv_quantization(model, KVQuantSettings.from_bits(4, 2, **SMALL), full_precision_prefix=1)
    rows = _prompts(tokenizer, (5, 21, 12))
    ids, mask = left_pad(rows, tokenizer.pad_token_id)

    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for index, row in enumerate(rows):
        single = model.generate(input_ids=torch.tensor([row]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert batched[index, -10:].tolist() == single[0, -10:].tolist()


def test_sampling_runs_on_the_quantized_cache_and_is_reproducible(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    install_kv_quantization(model, KVQuantSettings.from_bits(3, 3, **SMALL))
    ids, mask = left_pad(_prompts(tokenizer, (6, 14)), tokenizer.pad_token_id)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=0, pad_token_id=0,
                  return_dict_in_generate=True)

    torch.manual_seed(5)
    first = model.generate(**kwargs)
    torch.manual_seed(5)
    second = model.generate(**kwargs)

    assert isinstance(first.past_key_values, KeyFavoredQuantizedCache)
    assert torch.equal(first.sequences, second.sequences)


@torch.no_grad()
def _logits_through_cache(model, ids: torch.Tensor, cache, prefill: int) -> torch.Tensor:
    """Prefill, then one token per call, so every later token attends to the stored (quantized) KV."""
    logits = [model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    for position in range(prefill, ids.shape[1]):
        logits.append(model(input_ids=ids[:, position : position + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


def test_k8v8_logits_are_close_to_the_fp_cache_and_k2v2_are_not(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    ids = torch.tensor(_prompts(tokenizer, (40, 40)))
    reference = _logits_through_cache(model, ids, DynamicCache(config=model.config), prefill=16)

    def error(key_bits: int, value_bits: int) -> float:
        cache = KeyFavoredQuantizedCache(model.config, KVQuantSettings.from_bits(key_bits, value_bits, **SMALL))
        logits = _logits_through_cache(model, ids, cache, prefill=16)
        assert cache.get_seq_length() == ids.shape[1]
        assert cache.get_mask_sizes(1, 0) == (ids.shape[1] + 1, 0)
        return float((logits - reference).abs().max() / reference.abs().max())

    eight, two = error(8, 8), error(2, 2)
    assert within(eight, 2 * code_step(8))  # keys and values each within one 8-bit step of their largest magnitude
    assert beyond(two, 10 * eight)  # 2-bit steps are 85 times the 8-bit ones: the logits read the quantized K/V


def test_full_forward_attends_exactly_and_returns_the_quantized_cache(tiny_model_dirs):
    """The tokens of the current call are attended in full precision; only later calls read quantized KV."""
    model = load(tiny_model_dirs["llama"])
    ids = torch.tensor(_prompts(load_tokenizer(tiny_model_dirs["llama"]), (20,)))
    plain = model(input_ids=ids)

    install_kv_quantization(model, KVQuantSettings.from_bits(2, 2, **SMALL))
    quantized = model(input_ids=ids)

    assert isinstance(quantized.past_key_values, KeyFavoredQuantizedCache)
    assert quantized.past_key_values.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(quantized.logits, plain.logits, atol=0, rtol=0)


def test_callers_caches_are_left_alone_and_removal_restores_the_fp_cache(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    ids = torch.tensor([[BOS, 5, 6, 7, 8, 9]])
    hook = install_kv_quantization(model, KVQuantSettings.from_bits(4, 2, **SMALL))
    assert kv_quantization_of(model) is hook
    assert install_kv_quantization(model, KVQuantSettings.from_bits(8, 8)) is hook

    prefix = capture_prefix_kv(model, [BOS])  # runs with every hook silenced
    with hook.suspended():
        own = model_kv_for_prefix(model, [BOS])  # reads back its own DynamicCache
    assert all(torch.equal(a, b) for a, b in zip(prefix.keys, own.keys))
    filled = model(input_ids=ids[:, :3]).past_key_values
    assert model(input_ids=ids[:, 3:], past_key_values=filled).past_key_values is filled
    assert isinstance(model(input_ids=ids, use_cache=False).past_key_values, type(None))

    remove_kv_quantization(model)
    assert kv_quantization_of(model) is None
    assert type(model(input_ids=ids).past_key_values) is DynamicCache


def test_rows_can_be_reordered_across_padding_groups(tiny_model_dirs):
    """Beam search and batch expansion pick rows; each keeps its own full-precision prefix."""
    model = load(tiny_model_dirs["llama"])
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    ids, mask = left_pad(_prompts(tokenizer, (6, 15)), tokenizer.pad_token_id)
    cache = KeyFavoredQuantizedCache(model.config, KVQuantSettings.from_bits(4, 2, **SMALL), 1, [9, 0])
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache)
    keys, values = cache.layers[1].read()

    cache.reorder_cache(torch.tensor([1, 0, 1]))
    reordered_keys, reordered_values = cache.layers[1].read()
    assert torch.equal(reordered_keys, keys[[1, 0, 1]]) and torch.equal(reordered_values, values[[1, 0, 1]])

    cache.batch_select_indices(torch.tensor([False, True, True]))
    assert torch.equal(cache.layers[1].read()[0], keys[[0, 1]])
    with pytest.raises(NotImplementedError, match="cannot drop tokens"):
        cache.crop(-1)


def test_layout_is_fixed_once_the_cache_holds_tokens(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    cache = KeyFavoredQuantizedCache(model.config, KVQuantSettings(), full_precision_prefix=2)
    cache.full_precision_prefix = 3
    model(input_ids=torch.tensor([[BOS, 5, 6]]), past_key_values=cache)
    with pytest.raises(RuntimeError, match="only change while the cache is empty"):
        cache.full_precision_prefix = 1
    with pytest.raises(ValueError, match="rows but received states"):
        model(input_ids=torch.tensor([[5], [6]]), past_key_values=cache)
