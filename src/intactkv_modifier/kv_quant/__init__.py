"""Key-favored mixed-precision KV-cache quantization with the intact prefix in full precision.

"Quantize What Counts: More for Keys, Less for Values" (arXiv 2502.15075) gives
keys more bits than values for the same memory; KIVI (arXiv 2402.02750) groups
keys per channel and values per token and keeps the newest tokens exact. Here the
cache also keeps the IntactKV prefix (the pivot tokens, which a quantized cache
hurts most) in full precision.

* :class:`KVQuantSettings`: bits, grouping, residual window, per-layer overrides (JSON)
* :class:`KeyFavoredQuantizedCache`: the transformers ``Cache``, with packed storage
* :class:`StaticKeyFavoredQuantizedCache`: the same in preallocated buffers, for ``torch.compile`` / CUDA graphs,
  with :func:`static_implementation`, its decode attention (a Triton kernel on a GPU, fused sums elsewhere)
* :func:`install_kv_quantization`: make a model's forward and ``generate()`` use it
* :func:`allocate_bits`: per-layer bits from the K/V projection norms under a budget
"""

from intactkv_modifier.kv_quant.allocation import BitAllocation, allocate_bits, choose_bits
from intactkv_modifier.kv_quant.cache import KeyFavoredQuantizedCache, KeyFavoredQuantizedLayer
from intactkv_modifier.kv_quant.install import (
    KVQuantization,
    install_kv_quantization,
    kv_quantization_of,
    remove_kv_quantization,
)
from intactkv_modifier.kv_quant.quantizer import (
    QuantizedTensor,
    dequantize,
    full_precision_bytes_per_token,
    quantize,
    quantized_bytes_per_token,
)
from intactkv_modifier.kv_quant.settings import KVQuantSettings, LayerBits, TensorQuantSettings
from intactkv_modifier.kv_quant.static_attention import static_implementation
from intactkv_modifier.kv_quant.static_cache import StaticKeyFavoredQuantizedCache

__all__ = [
    "BitAllocation",
    "KVQuantSettings",
    "KVQuantization",
    "KeyFavoredQuantizedCache",
    "KeyFavoredQuantizedLayer",
    "LayerBits",
    "QuantizedTensor",
    "StaticKeyFavoredQuantizedCache",
    "TensorQuantSettings",
    "allocate_bits",
    "choose_bits",
    "dequantize",
    "full_precision_bytes_per_token",
    "install_kv_quantization",
    "kv_quantization_of",
    "quantize",
    "quantized_bytes_per_token",
    "remove_kv_quantization",
    "static_implementation",
]
