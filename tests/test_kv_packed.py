"""The packed attention path: the same attention as dequantize-then-attend, without a dequantized past.

The two paths add the same products in other orders (codes first, scales and offsets after), so every
comparison allows the rounding of the sums that differ (``tolerances``), relative to the largest value
compared. Through a whole model the reference path is given the packed path's codes: a rounding difference
upstream may move a later layer's K/V across a code's rounding boundary (one code, seen at 8 bits on an
Intel Xeon), which is no summation-order error; that the codes would differ by at most one is checked instead.
"""

from __future__ import annotations

import pytest
import torch
from test_kv_quant import BITS, GRANULARITIES, SMALL, _per_element, _prompts
from tiny_models import left_pad, load, load_tokenizer
from tolerances import packed_attention_sums, relative_error, reordered, scaled_error, within

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
from intactkv_modifier.kv_quant.packing import unpack
from intactkv_modifier.kv_quant.quantizer import QuantizedTensor
from intactkv_modifier.kv_quant.stream import QuantizedSegment

pytestmark = pytest.mark.numerics  # CI runs these under other CPU kernels and thread counts too


class SharedCodes:
    """Make a second run through a quantized cache store the first run's quantized blocks.

    :meth:`record` keeps each block the first run quantizes; :meth:`replay` then makes the second run quantize
    its own inputs, check them against the recorded ones (within ``states_bound``, relative; codes within one),
    and store the recorded block. Both runs must quantize the same blocks in the same order.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, states_bound: float):
        self.monkeypatch = monkeypatch
        self.states_bound = states_bound
        self.blocks: list[tuple[torch.Tensor, QuantizedTensor]] = []

    def record(self) -> None:
        self.blocks.clear()
        self.monkeypatch.setattr(stream, "quantize", self._record)

    def replay(self) -> None:
        self.monkeypatch.setattr(stream, "quantize", self._replay)

    def done(self) -> None:
        assert not self.blocks, f"the second run quantized {len(self.blocks)} blocks fewer"
        self.monkeypatch.setattr(stream, "quantize", quantize)

    def _record(self, states: torch.Tensor, settings: TensorQuantSettings) -> QuantizedTensor:
        block = quantize(states, settings)
        self.blocks.append((states.clone(), block))
        return block

    def _replay(self, states: torch.Tensor, settings: TensorQuantSettings) -> QuantizedTensor:
        recorded, block = self.blocks.pop(0)
        assert states.shape == recorded.shape and settings == block.settings
        assert within(relative_error(states, recorded), self.states_bound)  # earlier layers' attention rounding
        own = unpack(quantize(states, settings).codes, settings.bits).int()
        assert (own - unpack(block.codes, settings.bits).int()).abs().max() <= 1  # a rounding boundary, no more
        return block


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

    minimum = _per_element(quantized.minimum, settings)[:, :, skip:]
    summed = (reference - minimum).abs() + minimum.abs()  # |scale * code| + |minimum|: what the packed path adds

    scores = packed_ops.key_scores(query, segment), query @ reference.transpose(-1, -2)
    sums = packed_ops.weighted_values(probs, segment), probs @ reference
    # per element, relative to the magnitudes summed: head_dim products, then head_dim offsets (the codes' and
    # the offsets' sums), and the same over the tokens for the value sums
    assert within(scaled_error(*scores, query.abs() @ summed.transpose(-1, -2)), reordered([32, 32]))
    assert within(scaled_error(*sums, probs @ summed), reordered([64 - skip] * 2))


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
def test_packed_path_matches_the_reference_path_through_the_model(tiny_model_dirs, architecture, base, monkeypatch):
    """GQA (Llama: 4 heads on 2), sliding windows (Gemma 3), two padding groups, chunked prefill and decoding."""
    model = load(tiny_model_dirs[architecture])
    model.set_attn_implementation(packed_implementation(base))
    ids, mask = left_pad(_prompts(load_tokenizer(tiny_model_dirs[architecture]), (30, 39)), 0)
    bound = reordered(packed_attention_sums(model.config, ids.shape[1]))  # every layer reads its past otherwise
    codes = SharedCodes(monkeypatch, bound)
    for key_bits, value_bits in ((4, 2), (2, 2), (8, 8)):
        settings = KVQuantSettings.from_bits(key_bits, value_bits, **SMALL)

        def new_cache(packed: bool, settings: KVQuantSettings = settings) -> KeyFavoredQuantizedCache:
            return KeyFavoredQuantizedCache(model.config, settings, 1, [9, 0], packed_attention=packed)

        packed_cache = new_cache(True)
        codes.record()
        packed = _chunked_logits(model, ids, mask, packed_cache)
        codes.replay()
        reference = _chunked_logits(model, ids, mask, new_cache(False))
        codes.done()
        assert min(min(layer.quantized_tokens()["values"]) for layer in packed_cache.layers) > 0
        assert within(relative_error(packed, reference), bound), f"K{key_bits}V{value_bits}"


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
        # one layer, the same inputs: its own reads of the past only
        assert within(relative_error(*outputs), reordered(packed_attention_sums(model.config, 39, layers=1)))


def test_packed_decoding_never_dequantizes_and_generates_like_the_reference(tiny_model_dirs, monkeypatch):
    model = load(tiny_model_dirs["llama"])
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    ids, mask = left_pad(_prompts(tokenizer, (6, 21)), tokenizer.pad_token_id)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    bound = reordered(packed_attention_sums(model.config, ids.shape[1] + 16))  # every layer reads its past otherwise
    codes = SharedCodes(monkeypatch, bound)
    install_kv_quantization(model, KVQuantSettings.from_bits(4, 2, **SMALL), full_precision_prefix=1,
                            packed_attention=False)
    codes.record()
    reference = model.generate(**kwargs)

    def no_dequantize(*args, **kwargs):
        raise AssertionError("the packed path dequantized the past")

    monkeypatch.setattr(stream, "dequantize", no_dequantize)
    install_kv_quantization(model, KVQuantSettings.from_bits(4, 2, **SMALL), full_precision_prefix=1)
    codes.replay()
    packed = model.generate(**kwargs)
    codes.done()

    assert torch.equal(packed.sequences, reference.sequences)
    assert within(relative_error(torch.stack(packed.logits), torch.stack(reference.logits)), bound)


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
    # bfloat16 rounds to 2**-8 of a value: each path rounds query, scales, scores, probabilities and output once
    # per layer, at different points; 0.05 is 6.4 such roundings of the largest logit
    assert relative_error(*logits) < 0.05
