"""The Triton decode kernel against the torch packed path (itself tested against dequantize-then-attend).

Runs on a CUDA device, or on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, with ``triton`` installed); skipped elsewhere (CI).
Tolerance, float32: the rounding of the sums the kernel adds in another order (``tolerances``: its tiles and
its online softmax rescale them), relative to the largest output; through whole models the reference path gets
the kernel path's codes (``test_kv_packed.SharedCodes``). bfloat16 on the GPU: within 2 % of float32 attention
over the same codes, and no further from it than the torch path (measured: the two bfloat16 paths differ by 3 %
from each other, since they round the probabilities at different points).
"""

from __future__ import annotations

import pytest
import torch
from test_kv_packed import SharedCodes, _chunked_logits
from test_kv_quant import BITS, _prompts
from tiny_models import left_pad, load, load_tokenizer
from tolerances import packed_attention_sums, relative_error, reordered, within

from intactkv_modifier.kv_quant import KeyFavoredQuantizedCache, KVQuantSettings, TensorQuantSettings, quantize
from intactkv_modifier.kv_quant.attention import _attend, packed_implementation
from intactkv_modifier.kv_quant.fast_decode import kernel_available
from intactkv_modifier.kv_quant.stream import QuantizedSegment

pytestmark = pytest.mark.numerics  # CI runs these under other CPU kernels and thread counts too

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not kernel_available(DEVICE):
    pytest.skip("the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1)", allow_module_level=True)
decode_kernel = pytest.importorskip("intactkv_modifier.kv_quant.decode_kernel")

#: groups of 16 tokens (the kernel's smallest tile), 4 exact newest tokens
KERNEL_SMALL = dict(group_size=16, residual_length=4)


def _segments(batch: int, heads: int, head_dim: int, key_bits: int, value_bits: int, skip: int, dtype: torch.dtype):
    """Prefix (1 token) | quantized (96, outlier key channels) | residual (7) | new token, as keys and values."""
    generator = torch.Generator().manual_seed(key_bits * 10 + value_bits)

    def states(tokens: int, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        return (torch.randn(batch, heads, tokens, head_dim, generator=generator) * scale).to(DEVICE, dtype)

    key_settings = TensorQuantSettings(bits=key_bits, granularity="per_channel", group_size=32)
    value_settings = TensorQuantSettings(bits=value_bits, granularity="per_token", group_size=32)
    outliers = torch.logspace(-1, 1, head_dim)
    quantized_keys = quantize(states(96, outliers) + 0.3, key_settings)
    quantized_values = quantize(states(96), value_settings)
    keys = [states(1, 5.0), QuantizedSegment(quantized_keys, skip), states(7, outliers), states(1, outliers)]
    values = [states(1), QuantizedSegment(quantized_values, skip), states(7), states(1)]
    return keys, values, generator


@pytest.mark.parametrize("mask_kind", ["none", "boolean", "additive"])
@pytest.mark.parametrize("skip", [0, 5])
@pytest.mark.parametrize(("key_bits", "value_bits"), [(k, v) for k in BITS for v in BITS if k >= v])
def test_kernel_equals_the_torch_packed_path(key_bits, value_bits, skip, mask_kind):
    """GQA group of 3, two rows, a partly skipped first group, every mask form attention hands over."""
    keys, values, generator = _segments(2, 2, 64, key_bits, value_bits, skip, torch.float32)
    query = torch.randn(2, 2, 3, 64, generator=generator).to(DEVICE)
    columns = sum(segment.num_tokens if isinstance(segment, QuantizedSegment) else segment.shape[2] for segment in keys)
    keep = torch.ones(2, columns, dtype=torch.bool, device=DEVICE)
    keep[1, 0], keep[0, 10], keep[0, -3] = False, False, False  # a padded prefix, a quantized and a residual token
    mask = {"none": None, "boolean": keep,
            "additive": torch.zeros(2, columns, device=DEVICE).masked_fill(~keep, torch.finfo(torch.float32).min)}
    expected_mask = None if mask_kind == "none" else keep[:, None, None, :]
    expected = _attend(query.unsqueeze(3), keys, values, expected_mask, 0.125, None)[:, :, :, 0]

    exact_keys = torch.cat([keys[0], *keys[2:]], dim=2)
    exact_values = torch.cat([values[0], *values[2:]], dim=2)
    actual = decode_kernel.decode_attention(
        query, keys[1].tensor, values[1].tensor, skip, exact_keys, exact_values, 1, mask[mask_kind], 0.125
    )
    # scores over head_dim (the codes', then the offsets'), softmax and value sums over the columns
    assert within(relative_error(actual, expected), reordered([64, 64] + [columns] * 3))


def test_kernel_without_quantized_tokens_is_plain_attention():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 1, 4, 32, generator=generator).to(DEVICE)
    keys, values = (torch.randn(1, 1, 5, 32, generator=generator).to(DEVICE) for _ in range(2))
    expected = torch.softmax(query @ keys.transpose(-1, -2) * 0.2, dim=-1) @ values
    actual = decode_kernel.decode_attention(query, None, None, 0, keys, values, 0, None, 0.2)
    assert within(relative_error(actual, expected), reordered([32, 5, 5]))  # scores, softmax and value sums


@pytest.mark.parametrize("base", ["eager", "sdpa"])
@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_decoding_through_the_kernel_matches_the_reference_path(tiny_model_dirs, architecture, base, monkeypatch):
    """Whole models: two padding groups, chunked prefill, then one token per call read through the kernel."""
    calls = []
    original = decode_kernel.decode_attention
    monkeypatch.setattr(decode_kernel, "decode_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = load(tiny_model_dirs[architecture]).to(DEVICE)
    model.set_attn_implementation(packed_implementation(base))
    ids, mask = left_pad(_prompts(load_tokenizer(tiny_model_dirs[architecture]), (30, 39)), 0)
    settings = KVQuantSettings.from_bits(4, 2, **KERNEL_SMALL)
    bound = reordered(packed_attention_sums(model.config, ids.shape[1]))  # every layer reads its past otherwise
    codes = SharedCodes(monkeypatch, bound)
    logits = []
    for packed, share in ((True, codes.record), (False, codes.replay)):
        share()
        cache = KeyFavoredQuantizedCache(model.config, settings, 1, [9, 0], packed_attention=packed)
        logits.append(_chunked_logits(model, ids.to(DEVICE), mask.to(DEVICE), cache))
    codes.done()
    assert calls, "the kernel never ran"
    assert within(relative_error(*logits), bound)


@pytest.mark.gpu
def test_kernel_in_bfloat16_on_the_gpu_is_as_close_to_float32_as_the_torch_path():
    """Both paths round to bfloat16 at different points; each is compared with float32 attention over the same codes."""
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA device")
    keys, values, generator = _segments(3, 4, 128, 4, 2, 5, torch.bfloat16)
    query = torch.randn(3, 4, 8, 128, generator=generator).to(DEVICE, torch.bfloat16)

    def widened(segment):
        if isinstance(segment, QuantizedSegment):
            tensor = segment.tensor
            return QuantizedSegment(type(tensor)(tensor.codes, tensor.scale.float(), tensor.minimum.float(),
                                                 tensor.settings), segment.skip)
        return segment.float()

    exact = _attend(query.float().unsqueeze(3), [widened(s) for s in keys], [widened(s) for s in values], None,
                    128**-0.5, None)[:, :, :, 0]
    torch_path = _attend(query.unsqueeze(3), keys, values, None, 128**-0.5, None)[:, :, :, 0].float()
    kernel = decode_kernel.decode_attention(
        query, keys[1].tensor, values[1].tensor, 5, torch.cat([keys[0], *keys[2:]], dim=2),
        torch.cat([values[0], *values[2:]], dim=2), 1, None, 128**-0.5,
    ).float()
    # bfloat16 keeps 8 significant bits (a rounding is within 2**-8 of its value): the query, scales, scores,
    # probabilities and output round once each on the way, 5 * 2**-8 = 0.0195 of the largest output at most
    assert relative_error(kernel, exact) < 0.02
    assert relative_error(kernel, exact) <= 1.5 * relative_error(torch_path, exact)
