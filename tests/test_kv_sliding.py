"""The quantized cache on sliding-window layers (tiny Gemma 3): the FP cache's window, quantized."""

from __future__ import annotations

import pytest
import torch
from test_kv_quant import SMALL, _logits_through_cache, _prompts
from tiny_models import BOS, GEMMA3_SLIDING_WINDOW, left_pad, load, load_tokenizer
from tolerances import attention_layer_sums, beyond, code_step, relative_error, reordered, within
from transformers import DynamicCache

from intactkv_modifier import attach_intact_kv, capture_prefix_kv
from intactkv_modifier.architecture import attention_modules
from intactkv_modifier.config import KEY_BUFFER
from intactkv_modifier.kv_quant import KeyFavoredQuantizedCache, KVQuantSettings, install_kv_quantization, storage
from intactkv_modifier.kv_quant.measure import attention_inputs, attention_output, attention_output_error

pytestmark = pytest.mark.numerics  # CI runs these under other CPU kernels and thread counts too

#: prompts and generations run to 2.5 windows, so the sliding layer forgets most of what it saw
LENGTH = 5 * GEMMA3_SLIDING_WINDOW // 2


def test_layers_follow_the_model_and_mask_sizes_match_the_fp_cache(tiny_model_dirs):
    model = load(tiny_model_dirs["gemma3"])
    ids = torch.tensor(_prompts(load_tokenizer(tiny_model_dirs["gemma3"]), (LENGTH - 1,)))
    fp, quantized = DynamicCache(config=model.config), KeyFavoredQuantizedCache(model.config, KVQuantSettings())
    assert quantized.is_sliding == fp.is_sliding == [True, False]

    for cache in (fp, quantized):
        _logits_through_cache(model, ids, cache, prefill=GEMMA3_SLIDING_WINDOW // 2)
    for layer_idx in range(2):
        for query_length in (1, 5):
            sizes = quantized.get_mask_sizes(query_length, layer_idx)
            assert sizes == fp.get_mask_sizes(query_length, layer_idx)
    assert quantized.get_mask_sizes(1, 0) == (GEMMA3_SLIDING_WINDOW, LENGTH - GEMMA3_SLIDING_WINDOW + 1)


def test_eight_bit_logits_match_the_fp_cache_beyond_the_window(tiny_model_dirs):
    """Every decoded token reads the quantized window of the sliding layer and the whole quantized past of the other.

    Tolerance: max |logit difference| within two 8-bit steps of the largest logit (keys and values each within
    one step of their largest magnitude), while 2 bits differ ten times more, so the comparison does see the
    quantized tokens.
    """
    model = load(tiny_model_dirs["gemma3"])
    ids = torch.tensor(_prompts(load_tokenizer(tiny_model_dirs["gemma3"]), (LENGTH - 1, LENGTH - 1)))
    reference = _logits_through_cache(model, ids, DynamicCache(config=model.config), prefill=4)

    def error(bits: int) -> float:
        cache = KeyFavoredQuantizedCache(model.config, KVQuantSettings.from_bits(bits, bits, **SMALL))
        logits = _logits_through_cache(model, ids, cache, prefill=4)
        sliding = cache.layers[0]
        keys, _ = sliding.read()
        assert keys.shape[2] == GEMMA3_SLIDING_WINDOW - 1
        assert min(sliding.quantized_tokens()["keys"]) > 0 and min(sliding.quantized_tokens()["values"]) > 0
        return relative_error(logits, reference)

    eight, two = error(8), error(2)
    assert within(eight, 2 * code_step(8))
    assert beyond(two, 10 * eight)  # 2-bit steps are 85 times the 8-bit ones


def test_sliding_layer_memory_stays_bounded_by_the_window(tiny_model_dirs, monkeypatch):
    """Past the window the sliding layer holds a constant number of bytes, the full-attention layer keeps growing.

    No room is reserved ahead here, so the held bytes follow the stored tokens exactly.
    """
    monkeypatch.setattr(storage, "GROWTH", 0.0)
    monkeypatch.setattr(storage, "MIN_ROOM_TOKENS", 0)
    model = load(tiny_model_dirs["gemma3"])
    ids = torch.tensor(_prompts(load_tokenizer(tiny_model_dirs["gemma3"]), (4 * GEMMA3_SLIDING_WINDOW,)))
    cache = KeyFavoredQuantizedCache(model.config, KVQuantSettings.from_bits(4, 2, **SMALL))
    sizes = []
    with torch.no_grad():
        for position in range(ids.shape[1]):
            model(input_ids=ids[:, position : position + 1], past_key_values=cache, use_cache=True)
            sizes.append((cache.layers[0].nbytes, cache.layers[1].nbytes))
    window = GEMMA3_SLIDING_WINDOW
    sliding_late = {sliding for sliding, _ in sizes[2 * window :]}
    # per-channel keys forget whole groups: the held bytes cycle over one group, and never grow
    assert max(sliding_late) == max(sliding for sliding, _ in sizes[window : 2 * window])
    assert len(sliding_late) <= SMALL["group_size"]
    assert sizes[-1][1] > sizes[2 * window][1] > sizes[window][1]


def test_intact_prefix_is_exact_while_inside_the_window_then_forgotten(tiny_model_dirs):
    model = load(tiny_model_dirs["gemma3"])
    tokenizer = load_tokenizer(tiny_model_dirs["gemma3"])
    attach_intact_kv(model, [BOS], capture_prefix_kv(model, [BOS]))
    install_kv_quantization(model, KVQuantSettings.from_bits(2, 2, group_size=8, residual_length=0))
    ids = torch.tensor(_prompts(tokenizer, (LENGTH - 1,)))
    intact_key = getattr(attention_modules(model)[0], KEY_BUFFER)[:, 0]

    with torch.no_grad():
        cache = model(input_ids=ids[:, : GEMMA3_SLIDING_WINDOW - 1]).past_key_values
        assert min(cache.layers[0].quantized_tokens()["keys"]) > 0
        assert torch.equal(cache.layers[0].read()[0][0, :, 0], intact_key)
        for position in range(GEMMA3_SLIDING_WINDOW - 1, ids.shape[1]):
            cache = model(input_ids=ids[:, position : position + 1], past_key_values=cache).past_key_values
    assert cache.layers[0].get_mask_sizes(1)[1] > 0  # the window has left slot 0 behind
    assert cache.layers[0]._groups[0].keys.prefix.shape[2] == 0
    assert torch.equal(cache.layers[1].read()[0][0, :, 0], getattr(attention_modules(model)[1], KEY_BUFFER)[:, 0])


def test_left_padded_generate_matches_unbatched_and_the_fp_cache(tiny_model_dirs):
    """Rows cross the window at different steps; each still decodes as alone, and at 8 bits like the FP cache."""
    model = load(tiny_model_dirs["gemma3"])
    tokenizer = load_tokenizer(tiny_model_dirs["gemma3"])
    rows = _prompts(tokenizer, (5, 21, 12))
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    kwargs = dict(max_new_tokens=LENGTH - 21, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  output_logits=True)
    fp = model.generate(input_ids=ids, attention_mask=mask, **kwargs)

    install_kv_quantization(model, KVQuantSettings.from_bits(8, 8, **SMALL), full_precision_prefix=1)
    eight = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert isinstance(eight.past_key_values, KeyFavoredQuantizedCache)
    assert torch.equal(eight.sequences, fp.sequences)
    # keys and values each within one 8-bit step of their largest magnitude
    assert within(relative_error(torch.stack(eight.logits), torch.stack(fp.logits)), 2 * code_step(8))

    install_kv_quantization(model, KVQuantSettings.from_bits(4, 2, **SMALL), full_precision_prefix=1)
    batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs).sequences
    for index, row in enumerate(rows):
        single = model.generate(input_ids=torch.tensor([row]), **kwargs).sequences
        assert batched[index, -kwargs["max_new_tokens"] :].tolist() == single[0, -kwargs["max_new_tokens"] :].tolist()


def test_nbytes_is_every_byte_the_cache_keeps_alive(tiny_model_dirs):
    """No view into a larger storage survives an update (forgotten or quantized tokens would hide there)."""
    model = load(tiny_model_dirs["gemma3"])
    ids = torch.tensor(_prompts(load_tokenizer(tiny_model_dirs["gemma3"]), (LENGTH - 1,)))
    cache = KeyFavoredQuantizedCache(model.config, KVQuantSettings.from_bits(4, 2, **SMALL))
    _logits_through_cache(model, ids, cache, prefill=4)

    storages = {}
    for layer in cache.layers:
        for group in layer._groups:
            for stream in (group.keys, group.values):
                quantized = stream.quantized
                parts = [stream.prefix, stream.residual, *(
                    part.storage for part in (quantized.codes, quantized.scale, quantized.minimum)
                )]
                storages.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in parts})
    assert cache.nbytes == sum(storages.values())


def test_attention_error_is_measured_on_sliding_layers_beyond_the_window(tiny_model_dirs):
    """measure.py runs each layer with the mask the model would build: the window on sliding layers."""
    model = load(tiny_model_dirs["gemma3"])
    inputs = attention_inputs(model, torch.tensor(_prompts(load_tokenizer(tiny_model_dirs["gemma3"]), (LENGTH - 1,))))
    for layer in range(2):
        exact = attention_output(model, inputs, layer, DynamicCache(config=model.config), context=30)
        full_forward = model.model.layers[layer].self_attn(
            hidden_states=inputs[layer][0], position_embeddings=inputs[layer][1],
            attention_mask=_full_mask(LENGTH, GEMMA3_SLIDING_WINDOW if layer == 0 else None),
        )[0][:, 30:]
        # the same layer over a cache, against one call: its sums in other shapes
        assert within(relative_error(exact, full_forward), reordered(attention_layer_sums(model.config, LENGTH)))
        eight = attention_output_error(model, inputs, layer, KVQuantSettings.from_bits(8, 8, **SMALL), context=30)
        assert eight > 0 and within(eight, 2 * code_step(8))  # keys and values each within one 8-bit step


def _full_mask(length: int, window: int | None) -> torch.Tensor:
    positions = torch.arange(length)
    allowed = positions[None, :] <= positions[:, None]
    if window is not None:
        allowed &= positions[None, :] > positions[:, None] - window
    return torch.zeros(length, length).masked_fill_(~allowed, torch.finfo(torch.float32).min)[None, None]
