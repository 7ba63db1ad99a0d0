"""The packed attention path: the same attention as dequantize-then-attend, without a dequantized past.

Tolerance (float32): 1e-5 of the largest value compared, for the packed algebra
against the dequantized reference per op, per attention layer on the same
inputs, and per logit through whole models (measured: 2e-7 to 5e-7). Through a
whole model a rounding difference upstream can flip a code of a later layer's
K/V (seen at 3-bit keys: 5e-5), so every bit width is checked per layer.
"""

from __future__ import annotations

import pytest
import torch
from test_kv_quant import BITS, GRANULARITIES, SMALL, _prompts
from tiny_models import left_pad, load, load_tokenizer

from intactkv_modifier.kv_quant import (
    KeyFavoredQuantizedCache,
    KVQuantSettings,
    TensorQuantSettings,
    dequantize,
    install_kv_quantization,
    packed_ops,
    quantize,
    remove_kv_quantization,
    stream,
)
from intactkv_modifier.kv_quant.attention import packed_implementation, uses_packed_attention
from intactkv_modifier.kv_quant.measure import attention_inputs, attention_output
from intactkv_modifier.kv_quant.stream import QuantizedSegment

TOLERANCE = 1e-5


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("skip", [0, 5])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("bits", BITS)
def test_scores_and_value_sums_equal_those_of_the_dequantized_tensor(bits, granularity, skip, chunked, monkeypatch):
    """On random outlier-channel data, GQA-folded queries, a partly skipped first group, one chunk or many."""
    if chunked:
        monkeypatch.setattr(packed_ops, "CHUNK_ELEMENTS", 2 * 3 * 32 * 16)  # one 16-token group per chunk
    settings = TensorQuantSettings(bits=bits, granularity=granularity, group_size=16)
    states = torch.randn(2, 3, 64, 32) * torch.logspace(-1, 1, 32) + 0.3
    quantized = quantize(states, settings)
    segment = QuantizedSegment(quantized, skip)
    reference = dequantize(quantized)[:, :, skip:]
    query = torch.randn(2, 3, 6, 32)
    probs = torch.softmax(torch.randn(2, 3, 6, 64 - skip), dim=-1)

    assert _relative(packed_ops.key_scores(query, segment), query @ reference.transpose(-1, -2)) < TOLERANCE
    assert _relative(packed_ops.weighted_values(probs, segment), probs @ reference) < TOLERANCE


@torch.no_grad()
def _chunked_logits(model, ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """A left-padded batch fed as a 12-token prefill, a 7-token chunk, then one token per call."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    bounds = [0, 12, 19, *range(20, ids.shape[1] + 1)]
    logits = []
    for begin, end in zip(bounds, bounds[1:]):
        output = model(input_ids=ids[:, begin:end], attention_mask=mask[:, :end], position_ids=positions[:, begin:end],
                       past_key_values=cache, use_cache=True)
        logits.append(output.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("base", ["eager", "sdpa"])
@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_packed_path_matches_the_reference_path_through_the_model(tiny_model_dirs, architecture, base):
    """GQA (Llama: 4 heads on 2), sliding windows (Gemma 3), two padding groups, chunked prefill and decoding."""
    model = load(tiny_model_dirs[architecture])
    model.set_attn_implementation(packed_implementation(base))
    ids, mask = left_pad(_prompts(load_tokenizer(tiny_model_dirs[architecture]), (30, 39)), 0)
    for key_bits, value_bits in ((4, 2), (2, 2), (8, 8)):
        settings = KVQuantSettings.from_bits(key_bits, value_bits, **SMALL)

        def new_cache(packed: bool, settings: KVQuantSettings = settings) -> KeyFavoredQuantizedCache:
            return KeyFavoredQuantizedCache(model.config, settings, 1, [9, 0], packed_attention=packed)

        packed_cache = new_cache(True)
        packed = _chunked_logits(model, ids, mask, packed_cache)
        reference = _chunked_logits(model, ids, mask, new_cache(False))
        assert min(min(layer.quantized_tokens()["values"]) for layer in packed_cache.layers) > 0
        assert _relative(packed, reference) < TOLERANCE, f"K{key_bits}V{value_bits}"


@pytest.mark.parametrize("value_bits", BITS)
@pytest.mark.parametrize("key_bits", BITS)
def test_every_attention_layer_reads_the_packed_cache_like_the_reference(tiny_model_dirs, key_bits, value_bits):
    """Same hidden states into each layer: the packed path against the reference path, GQA, 8-token groups."""
    model = load(tiny_model_dirs["llama"])
    model.set_attn_implementation(packed_implementation("eager"))
    inputs = attention_inputs(model, torch.tensor(_prompts(load_tokenizer(tiny_model_dirs["llama"]), (39, 39))))
    settings = KVQuantSettings.from_bits(key_bits, value_bits, group_size=8, residual_length=4)
    for layer in range(model.config.num_hidden_layers):
        outputs = [
            attention_output(model, inputs, layer, KeyFavoredQuantizedCache(model.config, settings, 1,
                                                                             packed_attention=packed), context=25)
            for packed in (True, False)
        ]
        assert _relative(*outputs) < TOLERANCE


def test_packed_decoding_never_dequantizes_and_generates_like_the_reference(tiny_model_dirs, monkeypatch):
    model = load(tiny_model_dirs["llama"])
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    ids, mask = left_pad(_prompts(tokenizer, (6, 21)), tokenizer.pad_token_id)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    install_kv_quantization(model, KVQuantSettings.from_bits(4, 2, **SMALL), full_precision_prefix=1,
                            packed_attention=False)
    reference = model.generate(**kwargs)

    def no_dequantize(*args, **kwargs):
        raise AssertionError("the packed path dequantized the past")

    monkeypatch.setattr(stream, "dequantize", no_dequantize)
    install_kv_quantization(model, KVQuantSettings.from_bits(4, 2, **SMALL), full_precision_prefix=1)
    packed = model.generate(**kwargs)

    assert torch.equal(packed.sequences, reference.sequences)
    assert _relative(torch.stack(packed.logits), torch.stack(reference.logits)) < TOLERANCE


def test_install_switches_the_attention_implementation_and_removal_restores_it(tiny_model_dirs):
    model = load(tiny_model_dirs["qwen3"])
    install_kv_quantization(model, KVQuantSettings.from_bits(4, 2, **SMALL))
    assert model.config._attn_implementation == "intactkv_packed_eager" and uses_packed_attention(model.config)
    assert KeyFavoredQuantizedCache(model.config, KVQuantSettings()).layers[0].packed_attention

    install_kv_quantization(model, KVQuantSettings.from_bits(4, 2, **SMALL), packed_attention=False)
    assert model.config._attn_implementation == "eager"
    install_kv_quantization(model, KVQuantSettings.from_bits(4, 2, **SMALL))
    remove_kv_quantization(model)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="over eager or sdpa"):
        packed_implementation("flash_attention_2")


@pytest.mark.gpu
@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_packed_path_matches_the_reference_on_cuda_in_bfloat16(tiny_model_dirs, architecture):
    """The same algebra on the GPU, in the dtype models decode in there: a device and dtype check.

    The two paths round differently in bfloat16 (8 significant bits): on the CPU they differ by 2.1% (Llama) and
    0.6% (Gemma 3) of the largest logit; the float32 tests above are the tight ones.
    """
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = load(tiny_model_dirs[architecture]).to("cuda", torch.bfloat16)
    model.set_attn_implementation(packed_implementation("sdpa"))
    ids, mask = left_pad(_prompts(load_tokenizer(tiny_model_dirs[architecture]), (30, 39)), 0)
    settings = KVQuantSettings.from_bits(4, 2, **SMALL)
    logits = [
        _chunked_logits(model, ids.cuda(), mask.cuda(),
                        KeyFavoredQuantizedCache(model.config, settings, 1, [9, 0], packed_attention=packed)).float()
        for packed in (True, False)
    ]
    assert _relative(*logits) < 0.05
