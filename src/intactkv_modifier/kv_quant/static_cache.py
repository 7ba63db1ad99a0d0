"""A static-shape key-favored quantized cache: every buffer preallocated, so that a decode step can be one graph.

:class:`~intactkv_modifier.kv_quant.cache.KeyFavoredQuantizedCache` grows its
buffers and decides on the host, at every step, whether a block leaves the
residual; each of its steps is a dozen small operations and launches. Here, as
in transformers' ``StaticCache``, the shapes never change and the length lives
in a device tensor, so ``torch.compile`` (``mode="reduce-overhead"``: CUDA
graphs) can trace a decode step once and replay it. Along the token axis each
row of a layer's keys (and, separately, values) is kept in:

* the **prefix** ``[batch, heads, prefix, head_dim]``: the first
  ``full_precision_prefix`` slots, exact (the IntactKV prefix, and any left padding);
* the **quantized** region: packed codes, scales and minimums for every later
  slot up to ``max_cache_len``, plus one *scratch* block;
* the **ring** ``[batch, heads, residual_length + block, head_dim]``: the newest
  tokens, exact; slot ``p`` of the row sits at ``(p - prefix) % ring``.

The tokens quantized at a given length are those of the dynamic cache (the same
blocks, quantized by the same function, so the same codes from the same states):
after ``n`` slots, ``quantizable_tokens(n - prefix, residual_length, block)``.
A decode step writes the new token into the ring, then quantizes the oldest ring
block whether or not it is due, and writes it into its place when due and into
the scratch block when not: no host decision, no data-dependent shape. Where the
cache's own attention runs its Triton kernel, a Triton kernel also stores the step
(:mod:`~intactkv_modifier.kv_quant.static_store_kernel`: one launch, the same
codes, a block quantized only when due).

Attention reads the past position by position (``[batch, heads, max_cache_len,
head_dim]``: the prefix, then each later slot from the quantized region or from
the ring), with the new token exact, under the causal/padding mask transformers
builds for a static cache: slots not yet written are masked. Eagerly this builds
a dequantized copy of the whole buffer each step; compiled, the copy is a chain
of element-wise operations that the compiler can fuse into the attention that
reads it. With the cache's own decode attention
(:mod:`~intactkv_modifier.kv_quant.static_attention`) the step also hands its
layer over (:func:`take_decode_step`), so that a Triton kernel can read the
buffers as stored instead, and the read goes unused.

Prefill runs once, on an empty cache, with at least ``full_precision_prefix``
tokens; a later call of several tokens (chunked prefill, a second turn) is
refused, as are sliding-window layers: both need the dynamic cache.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from intactkv_modifier.architecture import kv_geometry, text_config
from intactkv_modifier.kv_quant.attention import uses_static_attention
from intactkv_modifier.kv_quant.fast_decode import kernel_available, static_kernel_store
from intactkv_modifier.kv_quant.quantizer import QuantizedTensor, dequantize, quantize
from intactkv_modifier.kv_quant.settings import KVQuantSettings, TensorQuantSettings
from intactkv_modifier.kv_quant.stream import quantizable_tokens

__all__ = [
    "StaticKeyFavoredQuantizedCache",
    "StaticKeyFavoredQuantizedLayer",
    "StaticTokenStore",
    "take_decode_step",
]


class StaticTokenStore:
    """Keys or values of one layer in preallocated buffers: exact prefix, quantized region (+ scratch block), ring.

    :param capacity: quantized slots, a multiple of ``block`` (the slots after the prefix, rounded up)
    :param residual_length: exact tokens kept after the quantized ones; the ring holds a block more
    """

    def __init__(
        self,
        settings: TensorQuantSettings,
        first: torch.Tensor,
        prefix_length: int,
        capacity: int,
        residual_length: int,
        block: int,
    ):
        self.settings = settings
        self.residual_length = residual_length
        self.block = block
        self.capacity = capacity
        batch, heads, _, head_dim = first.shape
        self.prefix = first.new_zeros((batch, heads, prefix_length, head_dim))
        self.ring = first.new_zeros((batch, heads, residual_length + block, head_dim))
        # the layout quantize() gives for a block of zeros, grown to the capacity plus the scratch block
        empty = quantize(first.new_zeros((batch, heads, block, head_dim)), settings)
        slots = (capacity + block) // block
        self.codes = empty.codes.new_zeros((batch, heads, slots * block, empty.codes.shape[-1]))
        statistics = (batch, heads, slots * empty.scale.shape[2], empty.scale.shape[-1])
        self.scale = empty.scale.new_zeros(statistics)
        self.minimum = empty.minimum.new_zeros(statistics)

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        return self.prefix, self.ring, self.codes, self.scale, self.minimum

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers)

    def quantized(self) -> QuantizedTensor:
        """The whole quantized region (scratch block excluded) as stored."""
        statistics = self.capacity // self.settings.token_block
        return QuantizedTensor(
            self.codes[:, :, : self.capacity],
            self.scale[:, :, :statistics],
            self.minimum[:, :, :statistics],
            self.settings,
        )

    def prefill(self, states: torch.Tensor) -> None:
        """Store the first call's states (at least the prefix) into an empty store; host arithmetic on shapes only."""
        prefix = self.prefix.shape[2]
        self.prefix.copy_(states[:, :, :prefix])
        rest = states[:, :, prefix:]
        count = quantizable_tokens(rest.shape[2], self.residual_length, self.block)
        if count:
            self._write_quantized(quantize(rest[:, :, :count], self.settings), 0)
        slots = torch.arange(count, rest.shape[2], device=states.device) % self.ring.shape[2]
        self.ring.index_copy_(2, slots, rest[:, :, count:])

    def decode(self, states: torch.Tensor, slot: torch.Tensor, quantized_before: torch.Tensor,
               quantized_after: torch.Tensor) -> None:
        """Store one token at quantized-region slot ``slot`` (a device scalar) and quantize a block if one is due.

        The oldest exact block, ``quantized_before ..`` (ring slots), is quantized every step and written to
        its place when the count grows, to the scratch block when it does not.
        """
        ring = self.ring.shape[2]
        self.ring.index_copy_(2, (slot % ring).reshape(1), states)
        offsets = torch.arange(self.block, device=states.device)
        block = quantize(self.ring.index_select(2, (quantized_before + offsets) % ring), self.settings)
        start = torch.where(quantized_after > quantized_before, quantized_before, self.capacity)
        self._write_quantized(block, start)

    def read(self, quantized_tokens: torch.Tensor, dtype: torch.dtype, slots: int) -> torch.Tensor:
        """The first ``slots`` slots ``[batch, heads, slots, head_dim]``: prefix, then quantized or ring, in order.

        A selection per slot between tensors of that length (the prefix and the quantized region padded to it,
        the ring gathered), no concatenation: compiled, every read stays a load inside the consumer's kernel
        (a concatenation would be written out first; an index_select of the dequantized region fails to
        compile in inductor, torch 2.13 on a CPU: "vr must not be None").
        """
        prefix = self.prefix.shape[2]
        later = torch.arange(slots, device=self.ring.device) - prefix  # negative in the prefix
        stored = torch.nn.functional.pad(dequantize(self.quantized(), dtype)[:, :, : slots - prefix], (0, 0, prefix, 0))
        exact = self.ring.index_select(2, later.remainder(self.ring.shape[2]))
        attended = torch.where((later < quantized_tokens).view(-1, 1), stored, exact)
        if not prefix:
            return attended
        first = torch.nn.functional.pad(self.prefix, (0, 0, 0, slots - prefix))
        return torch.where((later < 0).view(-1, 1), first, attended)

    def select_rows(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes former row ``index[i]``, in place (the buffers keep their addresses)."""
        for buffer in self.buffers:
            buffer.copy_(buffer.index_select(0, index))

    def zero_(self) -> None:
        for buffer in self.buffers:
            buffer.zero_()

    def _write_quantized(self, block: QuantizedTensor, start: int | torch.Tensor) -> None:
        tokens, per_statistic = block.codes.shape[2], self.settings.token_block
        device = self.codes.device
        self.codes.index_copy_(2, start + torch.arange(tokens, device=device), block.codes)
        rows = start // per_statistic + torch.arange(block.scale.shape[2], device=device)
        self.scale.index_copy_(2, rows, block.scale)
        self.minimum.index_copy_(2, rows, block.minimum)


class StaticKeyFavoredQuantizedLayer(CacheLayerMixin):
    """One full-attention layer's quantized K/V in static buffers; see the module docstring for the layout.

    :param max_cache_len: slots of a row, prefix included (the longest prompt plus generated tokens)
    :param full_precision_prefix: leading slots of every row kept exact
    :param hand_over: hand the layer to the attention call after each decode step (:func:`take_decode_step`)
        where the Triton kernel runs: only for the cache's own attention, which takes it; under any other the
        handed read would become an output of a compiled step, written out in full
    """

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        key_settings: TensorQuantSettings,
        value_settings: TensorQuantSettings,
        residual_length: int,
        max_cache_len: int,
        full_precision_prefix: int = 0,
        hand_over: bool = False,
    ):
        super().__init__()
        if not 0 <= full_precision_prefix <= max_cache_len:
            raise ValueError(f"full_precision_prefix {full_precision_prefix} must lie in 0 .. {max_cache_len}")
        self.key_settings, self.value_settings = key_settings, value_settings
        self.residual_length = residual_length
        self.max_cache_len = max_cache_len
        self.prefix_length = full_precision_prefix
        self.hand_over = hand_over
        self.block = _shared_block(key_settings, value_settings)
        self.capacity = -(-(max_cache_len - full_precision_prefix) // self.block) * self.block
        self.prefilled = False  # host flag set once, by the eager prefill: never changes during decoding
        self.kernel_path = False  # set at initialization: the Triton kernels store and attend (see update)
        self._host_length = 0  # counted in eager calls only (a compiled step cannot check without a host sync)
        self.length = torch.tensor(0, dtype=torch.long)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        shape = (self.prefix_length, self.capacity, self.residual_length, self.block)
        self.key_store = StaticTokenStore(self.key_settings, key_states, *shape)
        self.value_store = StaticTokenStore(self.value_settings, value_states, *shape)
        self.length = self.length.to(self.device)
        self.kernel_path = self.hand_over and kernel_available(self.device)
        if not torch.compiler.is_compiling():  # as transformers' StaticLayer: CUDA graphs need fixed addresses
            for buffer in (*self.key_store.buffers, *self.value_store.buffers, self.length):
                torch._dynamo.mark_static_address(buffer)
        self.is_initialized = True

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer (prefix, ring, codes, scales, minimums, scratch block included)."""
        return self.key_store.nbytes + self.value_store.nbytes if self.is_initialized else 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new states. Prefill returns them as they are; a decode step returns every slot (see module)."""
        tokens = key_states.shape[2]
        if not self.prefilled:
            return self._prefill(key_states, value_states)
        if tokens != 1:
            raise NotImplementedError(
                f"a static quantized cache takes one prefill, then one token per call; got {tokens} tokens after "
                "prefill (chunked prefill, a second turn): use KeyFavoredQuantizedCache"
            )
        self._count_host(1)
        length = self.length
        before = self.quantized_tokens(length)
        key_states, value_states = key_states.detach(), value_states.detach()
        if not (self.kernel_path and static_kernel_store(self, key_states, value_states)):
            slot, after = length - self.prefix_length, self.quantized_tokens(length + 1)
            self.key_store.decode(key_states, slot, before, after)
            self.value_store.decode(value_states, slot, before, after)
        self.length.add_(1)
        slots = self.max_cache_len
        keys, values = self.key_store.read(before, self.dtype, slots), self.value_store.read(before, self.dtype, slots)
        if self.kernel_path:  # the kernel is the handoff's only reader
            _hand_over(self, keys, before)
        return keys, values

    def quantized_tokens(self, length: torch.Tensor) -> torch.Tensor:
        """Slots in the quantized region once a row holds ``length`` (a device tensor): the dynamic cache's count."""
        pending = (length - self.prefix_length - self.residual_length).clamp_min(0)
        return pending // self.block * self.block

    def _prefill(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = key_states.shape[2]
        if tokens < self.prefix_length:
            raise ValueError(
                f"the prefill has {tokens} tokens but full_precision_prefix is {self.prefix_length}; "
                "the prefix (and any left padding) must be part of the prompt"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._count_host(tokens)
        self.key_store.prefill(key_states.detach())
        self.value_store.prefill(value_states.detach())
        self.length.fill_(tokens)
        self.prefilled = True
        return key_states, value_states

    def _count_host(self, tokens: int) -> None:
        if torch.compiler.is_compiling():
            return
        if self._host_length + tokens > self.max_cache_len:
            raise ValueError(
                f"the static cache holds {self.max_cache_len} slots per row and {self._host_length} are used; "
                f"{tokens} more do not fit: build it with a larger max_cache_len (prompt + max_new_tokens)"
            )
        self._host_length += tokens

    def get_seq_length(self) -> int | torch.Tensor:
        return self.length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # a decode step reads every slot (as transformers' StaticLayer); the prefill only its own tokens
        return (self.max_cache_len if self.prefilled else query_length), 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Empty the cache in place (the buffers keep their addresses, so a captured graph stays valid)."""
        if self.is_initialized:
            self.key_store.zero_()
            self.value_store.zero_()
            self.length.zero_()
        self.prefilled = False
        self._host_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a quantized KV cache cannot drop tokens (quantized blocks cannot be split back); "
            "assisted/speculative decoding needs a DynamicCache"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.key_store.select_rows(beam_idx.to(self.device))
            self.value_store.select_rows(beam_idx.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a static cache's batch size is fixed at its first update; build it per batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a static cache's batch size is fixed at its first update; build it per batch")


class _DecodeHandoff:
    """The layer whose decode step ran last, for the attention call after it: transformers hands attention only
    the tensors ``update`` returned, and a kernel that reads the stored codes needs the layer's buffers.

    Plain attributes of a module-level object: ``torch.compile`` traces setting and reading them within the step
    (in the compiled graph the returned read is then unused and dropped). Only layers built for the cache's own
    attention hand over (``hand_over``), and only where the kernel runs, so nothing waits here for an attention
    that never takes it, and a CPU's compiled step stays the graph it was (with the handoff, torch 2.13's inductor
    crashed on it with avx2 kernels).
    """

    layer: StaticKeyFavoredQuantizedLayer | None = None
    keys: torch.Tensor | None = None
    quantized_tokens: torch.Tensor | None = None


_HANDOFF = _DecodeHandoff()


def _hand_over(layer: StaticKeyFavoredQuantizedLayer, keys: torch.Tensor, quantized_tokens: torch.Tensor) -> None:
    _HANDOFF.layer, _HANDOFF.keys, _HANDOFF.quantized_tokens = layer, keys, quantized_tokens


def take_decode_step(keys: torch.Tensor) -> tuple[StaticKeyFavoredQuantizedLayer, torch.Tensor] | None:
    """The layer and the quantized slots its decode step attends, if ``keys`` is what that step just returned.

    Clears the handoff whatever the answer, so a stale layer is never read: attention called with any other
    keys (another cache, no cache, a prefill) gets ``None``.
    """
    layer, keys_handed, quantized_tokens = _HANDOFF.layer, _HANDOFF.keys, _HANDOFF.quantized_tokens
    _HANDOFF.layer = _HANDOFF.keys = _HANDOFF.quantized_tokens = None
    if layer is None or keys_handed is not keys:
        return None
    return layer, quantized_tokens


def _shared_block(keys: TensorQuantSettings, values: TensorQuantSettings) -> int:
    """Tokens that leave the residual together (as in the dynamic cache: the lcm of the two token blocks)."""
    return math.lcm(keys.token_block, values.token_block)


class StaticKeyFavoredQuantizedCache(Cache):
    """The key-favored quantized KV cache with static shapes, for ``torch.compile`` and CUDA graphs.

    :param config: the model's config; every layer must be a full-attention layer
    :param settings: bits, grouping and residual window (as for the dynamic ``KeyFavoredQuantizedCache``)
    :param max_cache_len: slots of a row (prompt, left padding included, plus generated tokens)
    :param full_precision_prefix: leading slots of every row kept in full precision: the IntactKV prefix length,
        plus the largest left padding of the batch for a padded batch (then pads never enter a quantization group)
    :param static_attention: whether the model attends with the cache's own decode attention
        (:func:`~intactkv_modifier.kv_quant.static_attention.static_implementation`); by default read from
        ``config``, so set the implementation before building the cache

    Example::

        model.set_attn_implementation(static_implementation("sdpa"))
        cache = StaticKeyFavoredQuantizedCache(model.config, KVQuantSettings(), max_cache_len=4096)
        model.forward = torch.compile(model.forward, mode="reduce-overhead")
        model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
    """

    def __init__(
        self,
        config: PretrainedConfig,
        settings: KVQuantSettings,
        max_cache_len: int,
        full_precision_prefix: int = 0,
        static_attention: bool | None = None,
    ):
        layer_types, _ = get_layer_types_and_kwargs(text_config(config))
        unsupported = sorted(set(layer_types) - {"full_attention"})
        if unsupported:
            raise ValueError(
                f"StaticKeyFavoredQuantizedCache supports full-attention layers only; this model also has "
                f"{unsupported}: use KeyFavoredQuantizedCache"
            )
        geometry = kv_geometry(config)
        settings.check_model(geometry)
        hand_over = uses_static_attention(config) if static_attention is None else static_attention
        layers = [
            StaticKeyFavoredQuantizedLayer(
                *settings.for_layer(index), settings.residual_length, max_cache_len, full_precision_prefix, hand_over
            )
            for index in range(geometry.num_layers)
        ]
        super().__init__(layers=layers)
        self.settings = settings
        self.full_precision_prefix = full_precision_prefix

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the cache holds, over all layers."""
        return sum(layer.nbytes for layer in self.layers)
