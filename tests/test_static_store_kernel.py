"""The static cache's store kernel against its torch store: the same ring, codes, scales and minimums, bit for bit.

Runs on a CUDA device, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, with ``triton``
installed); skipped elsewhere (CI). The torch store (``StaticTokenStore.decode``) stays the reference: it is
``quantize`` itself, which the dynamic cache's tests pin.
"""

from __future__ import annotations

import pytest
import torch

from intactkv_modifier.kv_quant import KVQuantSettings, TensorQuantSettings
from intactkv_modifier.kv_quant.fast_decode import kernel_available, static_kernel_store
from intactkv_modifier.kv_quant.static_cache import StaticKeyFavoredQuantizedLayer

pytestmark = pytest.mark.numerics

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not kernel_available(DEVICE):
    pytest.skip("the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1)", allow_module_level=True)


def _layers(key_bits: int, value_bits: int, group: int, residual: int, prefix: int, max_len: int):
    """A layer that stores through the kernel and one that stores through torch ops, same settings."""
    settings = KVQuantSettings.from_bits(key_bits, value_bits, group_size=group, residual_length=residual)
    shape = (*settings.for_layer(0), residual, max_len, prefix)
    return StaticKeyFavoredQuantizedLayer(*shape, hand_over=True), StaticKeyFavoredQuantizedLayer(*shape)


def _stored(layer: StaticKeyFavoredQuantizedLayer) -> list[torch.Tensor]:
    """Every buffer but the scratch block (the torch store writes a block it does not keep there)."""
    buffers = []
    for store in (layer.key_store, layer.value_store):
        quantized = store.quantized()
        buffers += [store.prefix, store.ring, quantized.codes, quantized.scale, quantized.minimum]
    return buffers


@pytest.mark.parametrize(
    ("key_bits", "value_bits", "group", "residual", "prefix", "dtype"),
    [
        (4, 2, 16, 4, 3, torch.bfloat16),
        (2, 4, 16, 0, 0, torch.float16),  # no residual: the due block ends with the new token
        (3, 3, 8, 5, 1, torch.float32),  # 3-bit codes: 8 in 3 bytes, the ring 13 slots
        (8, 8, 32, 2, 2, torch.bfloat16),
    ],
)
def test_the_store_kernel_writes_the_torch_stores_bits(key_bits, value_bits, group, residual, prefix, dtype):
    """Prefill 21 tokens, then 70 steps one token at a time (at least two blocks due, the ring wrapping many times),
    states with outlier channels and a constant channel: after every step the two layers hold the same bits."""
    torch.manual_seed(0)
    batch, kv_heads, head_dim, prompt, steps = 2, 3, 32, 21, 70
    kernel_layer, torch_layer = _layers(key_bits, value_bits, group, residual, prefix, prompt + steps)
    states = torch.randn(2, batch, kv_heads, prompt + steps, head_dim) * torch.logspace(0, 3, head_dim)
    states[..., 5] = 0.75  # a group whose scale clamps to the dtype's smallest
    states = states.to(dtype).to(DEVICE)
    for layer in (kernel_layer, torch_layer):
        layer.update(states[0, :, :, :prompt], states[1, :, :, :prompt])
    assert kernel_layer.kernel_path and not torch_layer.kernel_path
    quantized_at_prefill = int(torch_layer.quantized_tokens(torch_layer.length))
    for step in range(prompt, prompt + steps):
        new = states[:, :, :, step : step + 1]
        for layer in (kernel_layer, torch_layer):
            layer.update(new[0].clone(), new[1].clone())
        for mine, reference in zip(_stored(kernel_layer), _stored(torch_layer), strict=True):
            assert torch.equal(mine, reference), f"step {step}"
    assert int(torch_layer.quantized_tokens(torch_layer.length)) - quantized_at_prefill >= 2 * group


def test_layouts_the_kernel_cannot_hold_go_through_torch_ops():
    """Heads of 48 channels in per-token groups of 12 (neither a power of two): the kernel writes nothing and says
    so, and the layer's decode steps store what a layer built without the kernel stores."""
    values = TensorQuantSettings(bits=4, granularity="per_token", group_size=12)
    keys = TensorQuantSettings(bits=4, granularity="per_channel", group_size=16)
    layer, reference = (StaticKeyFavoredQuantizedLayer(keys, values, 4, 64, 0, hand_over=h) for h in (True, False))
    states = torch.randn(1, 2, 40, 48, device=DEVICE)
    for twin in (layer, reference):
        twin.update(states[:, :, :20], states[:, :, :20])
    before = [buffer.clone() for buffer in _stored(layer)]
    assert not static_kernel_store(layer, states[:, :, 20:21], states[:, :, 20:21])
    assert all(torch.equal(a, b) for a, b in zip(before, _stored(layer), strict=True))
    for step in range(20, 40):
        for twin in (layer, reference):
            twin.update(states[:, :, step : step + 1], states[:, :, step : step + 1])
    assert all(torch.equal(a, b) for a, b in zip(_stored(layer), _stored(reference), strict=True))
    assert int(layer.quantized_tokens(layer.length)) > 0
