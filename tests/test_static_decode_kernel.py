"""The static cache's Triton decode kernel against the static cache's own read (dequantized past, then sdpa).

Runs on a CUDA device, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, with ``triton``
installed); skipped elsewhere (CI). Both paths attend the same stored codes (the cache writes them before either
reads), so the logits differ by the order of the sums only: the kernel's tiles and online softmax against sdpa
over every ``max_cache_len`` slot.
"""

from __future__ import annotations

import pytest
import torch
from test_kv_static import MAX_CACHE_LEN, _generate
from tiny_models import left_pad, load, load_tokenizer, text_samples
from tolerances import relative_error, reordered, two_forwards, within

from intactkv_modifier.kv_quant import KVQuantSettings, StaticKeyFavoredQuantizedCache, static_implementation
from intactkv_modifier.kv_quant.fast_decode import kernel_available, static_kernel_decode
from intactkv_modifier.kv_quant.static_cache import StaticKeyFavoredQuantizedLayer, take_decode_step

pytestmark = pytest.mark.numerics

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not kernel_available(DEVICE):
    pytest.skip("the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1)", allow_module_level=True)
static_decode_kernel = pytest.importorskip("intactkv_modifier.kv_quant.static_decode_kernel")

#: groups of 16 tokens (the kernel's smallest tile) and a residual of 4: 40 steps cross two block boundaries
SETTINGS = KVQuantSettings.from_bits(4, 2, group_size=16, residual_length=4)


def _count_calls(monkeypatch, kernel: str) -> list[int]:
    """A list that grows by one at every call of ``static_decode_kernel.<kernel>``."""
    calls: list[int] = []
    original = getattr(static_decode_kernel, kernel)
    monkeypatch.setattr(static_decode_kernel, kernel, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("prefix_tokens", [0, 3])
def test_decoding_through_the_kernel_matches_the_static_read_path(tiny_model_dirs, prefix_tokens, monkeypatch):
    """A left-padded batch (pads in the exact prefix, masked), 40 steps: every decode step of every layer runs the
    kernel, and the tokens and logits are the read path's."""
    model = load(tiny_model_dirs["llama"]).to(DEVICE)
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    texts = text_samples(2, 20)
    ids, mask = left_pad([tokenizer(t)["input_ids"][:n] for t, n in zip(texts, (9, 20))], tokenizer.pad_token_id)
    prefix = int((mask == 0).sum(dim=1).max()) + prefix_tokens
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)

    def decode() -> object:
        cache = StaticKeyFavoredQuantizedCache(model.config, SETTINGS, MAX_CACHE_LEN, full_precision_prefix=prefix)
        return _generate(model, ids, mask, cache)

    reference = decode()
    calls = _count_calls(monkeypatch, "static_kernel_attention")
    model.set_attn_implementation(static_implementation("sdpa"))
    result = decode()

    steps = len(result.logits) - 1  # the first logits come from the prefill
    assert len(calls) == steps * model.config.num_hidden_layers
    assert torch.equal(result.sequences, reference.sequences)
    bound = two_forwards(model.config, MAX_CACHE_LEN)
    assert within(relative_error(torch.stack(result.logits), torch.stack(reference.logits)), bound)


def test_attention_handed_other_keys_gets_no_layer(tiny_model_dirs):
    """The handoff holds the last decode step's layer only for the keys that step returned, and only once; a cache
    built for another attention hands nothing over."""
    model = load(tiny_model_dirs["llama"]).to(DEVICE)
    ids = torch.randint(3, 100, (1, 13), device=DEVICE)
    states = torch.randn(1, 2, 1, 32, device=DEVICE)
    with torch.no_grad():
        plain = StaticKeyFavoredQuantizedCache(model.config, SETTINGS, MAX_CACHE_LEN)  # sdpa: no handoff
        model(ids, past_key_values=plain)
        keys, _ = plain.layers[0].update(states, states)
        assert take_decode_step(keys) is None
        cache = StaticKeyFavoredQuantizedCache(model.config, SETTINGS, MAX_CACHE_LEN, static_attention=True)
        model(ids, past_key_values=cache)  # prefill: nothing handed over
        layer = cache.layers[0]
        keys, _ = layer.update(states, states)
        assert take_decode_step(states) is None  # other keys: not this step's
        assert take_decode_step(keys) is None  # cleared by the first take
        keys, _ = layer.update(states, states)
        handed = take_decode_step(keys)
    assert handed is not None and handed[0] is layer


@pytest.mark.parametrize(
    ("tuning", "prefix"),
    [
        ({"tile": 16, "target_programs": 256}, 1),  # 38 splits of 16 tokens: 39 partial results, two merge steps
        ({"tile": 64, "target_programs": 8}, 0),  # 2 splits of 5 tiles, each tile 4 key groups
        ({"tile": 128, "target_programs": 512, "num_warps": 8, "exact_tile": 32}, 2),  # 5 splits,
        # the last tile past the filled slots; the 20-slot ring in one tile
    ],
)
def test_the_kernel_attends_every_slot_whatever_its_launch_tuning(tuning, prefix):
    """One layer after 581 tokens (the prefix, 560 or 576 quantized, the rest in the wrapped ring) of 600 slots:
    the kernel's output for each tiling and split count is sdpa's over the step's read, within two
    summation orders."""
    torch.manual_seed(0)
    batch, kv_heads, group, head_dim, tokens = 2, 2, 3, 32, 580
    layer = StaticKeyFavoredQuantizedLayer(*SETTINGS.for_layer(0), 4, 600, prefix, hand_over=False)
    states = torch.randn(2, batch, kv_heads, tokens, head_dim, device=DEVICE)
    layer.update(states[0], states[1])
    new = torch.randn(2, batch, kv_heads, 1, head_dim, device=DEVICE)
    before = layer.quantized_tokens(layer.length)
    keys, values = layer.update(new[0], new[1])
    query = torch.randn(batch, kv_heads * group, 1, head_dim, device=DEVICE)
    mask = (torch.arange(600, device=DEVICE) <= tokens).expand(batch, 1, 1, 600).clone()
    mask[1, ..., prefix + 7] = False  # a masked column inside the quantized region
    output = static_kernel_decode(query, layer, before, mask, head_dim**-0.5, None, tuning)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, enable_gqa=True
    ).transpose(1, 2)
    assert output is not None
    assert within(relative_error(output, expected), 2 * reordered([head_dim, tokens + 1]))
