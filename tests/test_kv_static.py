"""The static-shape quantized cache: the dynamic cache's numbers, a graph torch.compile traces whole, fixed memory."""

from __future__ import annotations

import pytest
import torch
from cpu_compile import needs_vectorizing_cpu_compiler
from tiny_models import BOS, left_pad, load, load_tokenizer, text_samples
from tolerances import relative_error, two_forwards, within
from transformers import StaticCache
from transformers.generation import CompileConfig

from intactkv_modifier import PrefixKV, attach_intact_kv, capture_prefix_kv
from intactkv_modifier.architecture import attention_modules, kv_geometry
from intactkv_modifier.config import KEY_BUFFER, VALUE_BUFFER
from intactkv_modifier.kv_quant import (
    KeyFavoredQuantizedCache,
    KVQuantSettings,
    StaticKeyFavoredQuantizedCache,
    quantized_bytes_per_token,
    static_implementation,
)

pytestmark = pytest.mark.numerics

#: groups of 8 tokens and a residual of 4: a 13-token prompt and 40 steps cross five block boundaries
SETTINGS = KVQuantSettings.from_bits(4, 2, group_size=8, residual_length=4)
MAX_CACHE_LEN = 64


def _prompts(tokenizer, lengths: tuple[int, ...]) -> list[list[int]]:
    texts = text_samples(len(lengths), max(lengths))
    return [tokenizer(t)["input_ids"][:n] for t, n in zip(texts, lengths)]


def _generate(model, ids, mask, cache, compile_config: CompileConfig | None = None, new_tokens: int = 40):
    """Greedy tokens and logits; compiled only with ``compile_config`` (on a GPU generate would compile a
    static cache's steps by itself)."""
    return model.generate(
        input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False,
        pad_token_id=0, return_dict_in_generate=True, output_logits=True, compile_config=compile_config,
        disable_compile=compile_config is None,
    )


def _cpu_compile(fullgraph: bool = True) -> CompileConfig:
    """generate()'s compiled decode step on a CPU (it compiles on accelerators only unless told otherwise)."""
    config = CompileConfig(fullgraph=fullgraph, mode="default")
    config._compile_all_devices = True
    return config


def _static(model, prefix: int, max_cache_len: int = MAX_CACHE_LEN) -> StaticKeyFavoredQuantizedCache:
    return StaticKeyFavoredQuantizedCache(model.config, SETTINGS, max_cache_len, full_precision_prefix=prefix)


@pytest.mark.parametrize("prefix", [0, 3])
def test_static_cache_decodes_like_the_dynamic_cache_with_the_same_codes(tiny_model_dirs, prefix):
    """Prefill, then 40 single-token steps across five block boundaries, against the dynamic cache's reference path.

    Attention over all ``max_cache_len`` slots (the unwritten ones masked, adding exact zeros) sums in another
    order than over the written ones: the logits agree to two forwards' reordering at that length. Layer 0's
    states are computed alike in both, so its codes must be bit-identical.
    """
    model = load(tiny_model_dirs["llama"])
    ids = torch.randint(3, 100, (2, 13), generator=torch.Generator().manual_seed(0))
    dynamic = KeyFavoredQuantizedCache(model.config, SETTINGS, full_precision_prefix=prefix, packed_attention=False)
    static = _static(model, prefix)
    reference, result = _generate(model, ids, None, dynamic), _generate(model, ids, None, static)

    assert torch.equal(result.sequences, reference.sequences)
    bound = two_forwards(model.config, MAX_CACHE_LEN)
    assert within(relative_error(torch.stack(result.logits), torch.stack(reference.logits)), bound)
    layer = static.layers[0]
    stored = layer.quantized_tokens(layer.length)
    expected = dynamic.layers[0]._groups[0].keys.quantized.tensor()
    assert int(stored) == expected.num_tokens == dynamic.layers[0].quantized_tokens()["keys"][0] > 0
    assert torch.equal(layer.key_store.codes[:, :, : int(stored)], expected.codes)


def test_a_left_padded_batch_decodes_like_the_dynamic_cache(tiny_model_dirs):
    """Pads inside the full-precision prefix (the largest padding plus an intact prefix of 1), masked by generate."""
    model = load(tiny_model_dirs["llama"])
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    ids, mask = left_pad(_prompts(tokenizer, (6, 15)), tokenizer.pad_token_id)
    prefix = int((mask == 0).sum(dim=1).max()) + 1
    dynamic = KeyFavoredQuantizedCache(model.config, SETTINGS, full_precision_prefix=prefix, packed_attention=False)
    reference, result = _generate(model, ids, mask, dynamic), _generate(model, ids, mask, _static(model, prefix))

    assert torch.equal(result.sequences, reference.sequences)
    bound = two_forwards(model.config, MAX_CACHE_LEN)
    assert within(relative_error(torch.stack(result.logits), torch.stack(reference.logits)), bound)


def test_beam_search_reorders_the_rows_in_place_like_the_dynamic_cache(tiny_model_dirs):
    """Three beams diverge and are reordered at every step (without the reordering the sequences differ)."""
    model = load(tiny_model_dirs["llama"])
    ids = torch.randint(3, 100, (1, 13), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=30, do_sample=False, num_beams=3, pad_token_id=0)
    dynamic = KeyFavoredQuantizedCache(model.config, SETTINGS, full_precision_prefix=2, packed_attention=False)
    reference = model.generate(ids, past_key_values=dynamic, **kwargs)
    assert torch.equal(model.generate(ids, past_key_values=_static(model, 2), **kwargs), reference)


def test_the_intact_prefix_stays_bit_exact_through_decoding(tiny_model_dirs):
    """The spliced prefix K/V (doubled, so unlike what the model would compute) lands in the exact prefix slots."""
    model = load(tiny_model_dirs["llama"])
    own = capture_prefix_kv(model, [BOS])
    attach_intact_kv(model, [BOS], PrefixKV(keys=[k * 2 for k in own.keys], values=[v * 2 for v in own.values]))
    ids = torch.cat([torch.full((2, 1), BOS), torch.randint(3, 100, (2, 12))], dim=1)
    cache = _static(model, 1)
    _generate(model, ids, None, cache, new_tokens=20)

    for layer, attention in zip(cache.layers, attention_modules(model)):
        assert int(layer.quantized_tokens(layer.length)) > 0
        for store, buffer in ((layer.key_store, KEY_BUFFER), (layer.value_store, VALUE_BUFFER)):
            assert torch.equal(store.prefix[:, :, 0], getattr(attention, buffer)[:, 0].expand(2, -1, -1))


@needs_vectorizing_cpu_compiler
@pytest.mark.parametrize("fused_attention", [False, True])
def test_a_compiled_decode_step_traces_as_one_graph_and_generates_the_eager_tokens(tiny_model_dirs, fused_attention):
    """``fullgraph=True`` fails on any graph break; the fused decode attention runs only when compiled.

    On one thread: inductor's C++ kernels split their reductions by the thread count, and with 2 threads on avx2
    kernels that float32 drift once moved a quantization code across its rounding boundary, after which the greedy
    tokens parted. What this test claims is the trace and the algorithm, so both runs use one thread; the other
    thread counts are the numerics matrix's eager tests.
    """
    torch._dynamo.reset()
    model = load(tiny_model_dirs["llama"])
    if fused_attention:
        model.set_attn_implementation(static_implementation("sdpa"))
    ids = torch.randint(3, 100, (2, 13), generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eager = _generate(model, ids, None, _static(model, 2))
        compiled = _generate(model, ids, None, _static(model, 2), _cpu_compile())
    finally:
        torch.set_num_threads(threads)

    assert torch.equal(compiled.sequences, eager.sequences)
    bound = two_forwards(model.config, MAX_CACHE_LEN)
    assert within(relative_error(torch.stack(compiled.logits), torch.stack(eager.logits)), bound)


def test_the_cache_refuses_tokens_beyond_max_cache_len_and_a_second_multi_token_call(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    ids = torch.randint(3, 100, (1, 13))
    cache = _static(model, 2, max_cache_len=16)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        for _ in range(3):
            model(ids[:, :1], past_key_values=cache)
        with pytest.raises(ValueError, match="larger max_cache_len"):
            model(ids[:, :1], past_key_values=cache)
        with pytest.raises(NotImplementedError, match="KeyFavoredQuantizedCache"):
            model(ids[:, :2], past_key_values=cache)
        with pytest.raises(ValueError, match="larger max_cache_len"):
            model(torch.randint(3, 100, (1, 17)), past_key_values=_static(model, 2, max_cache_len=16))
        with pytest.raises(ValueError, match="must be part of the prompt"):
            model(ids[:, :2], past_key_values=_static(model, 3))


def test_sliding_window_models_are_refused_with_the_cache_to_use(tiny_model_dirs):
    model = load(tiny_model_dirs["gemma3"])
    with pytest.raises(ValueError, match="full-attention layers only.*KeyFavoredQuantizedCache"):
        _static(model, 0)


def test_memory_held_is_the_packed_format_of_max_cache_len_plus_the_exact_prefix_and_ring(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    geometry = kv_geometry(model.config)
    prefix, max_cache_len, batch = 3, 1024, 2
    cache = StaticKeyFavoredQuantizedCache(model.config, SETTINGS, max_cache_len, full_precision_prefix=prefix)
    with torch.no_grad():
        model(torch.randint(3, 100, (batch, 13)), past_key_values=cache)

    block = SETTINGS.keys.group_size  # values are per token: the keys' groups are the blocks
    quantized_slots = -(-(max_cache_len - prefix) // block) * block + block  # rounded up, plus the scratch block
    exact_slots = prefix + SETTINGS.residual_length + block  # prefix and ring
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    heads, head_dim = geometry.num_key_value_heads, geometry.head_dim
    exact = exact_slots * heads * head_dim * itemsize
    per_layer = sum(
        quantized_slots * quantized_bytes_per_token(settings, heads, head_dim, model.dtype) + exact
        for settings in (SETTINGS.keys, SETTINGS.values)
    )
    assert cache.nbytes == batch * geometry.num_layers * per_layer

    full_precision = StaticCache(model.config, max_cache_len=max_cache_len)
    with torch.no_grad():
        model(torch.randint(3, 100, (batch, 13)), past_key_values=full_precision)
    held = sum(t.numel() * t.element_size() for layer in full_precision.layers for t in (layer.keys, layer.values))
    # K4V2 with groups of 8 in float32: 1.5 and 1.25 bytes per 4-byte element (0.34 of it), before prefix and ring
    assert cache.nbytes < held / 2


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [8, 16])
def test_cuda_graphs_replay_the_decode_step_with_the_eager_tokens(tiny_model_dirs, group_size):
    """``mode="reduce-overhead"``: the step is captured once and replayed; its tokens are the eager ones.

    Groups of 8 tokens are below the Triton kernel's smallest tile: the compiled step attends through the fused
    sums, the eager one through sdpa; groups of 16: the kernel, eagerly and replayed. In float32, so that the two
    differ by the order of the sums only.
    """
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch._dynamo.reset()
    model = load(tiny_model_dirs["llama"]).to("cuda")
    model.set_attn_implementation(static_implementation("sdpa"))
    ids = torch.randint(3, 100, (2, 13), generator=torch.Generator().manual_seed(2)).cuda()
    settings = KVQuantSettings.from_bits(4, 2, group_size=group_size, residual_length=4)

    def cache() -> StaticKeyFavoredQuantizedCache:
        return StaticKeyFavoredQuantizedCache(model.config, settings, MAX_CACHE_LEN, full_precision_prefix=2)

    eager = _generate(model, ids, None, cache())
    compiled = _generate(model, ids, None, cache(), CompileConfig(fullgraph=True))

    assert torch.equal(compiled.sequences, eager.sequences)
    bound = two_forwards(model.config, MAX_CACHE_LEN)
    assert within(relative_error(torch.stack(compiled.logits), torch.stack(eager.logits)), bound)
