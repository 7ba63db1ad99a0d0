"""A transformers ``Cache`` that keeps K/V in packed low-bit form, with the intact prefix in full precision.

Along the token axis each row of each layer's keys (and, separately, values)
is stored in three parts:

* the **prefix**: the row's left padding plus the first ``full_precision_prefix``
  tokens, never quantized. The IntactKV prefix lives there, so the pivot tokens'
  KV, which a quantized cache would hurt most, stays exactly as spliced;
* the **quantized** blocks: packed codes plus scales/minimums
  (:mod:`~intactkv_modifier.kv_quant.quantizer`);
* the **residual**: the newest tokens, at least ``residual_length`` of them, in
  full precision (KIVI). Tokens leave it for the quantized part in whole blocks,
  keys and values together: ``group_size`` tokens when the keys are grouped per
  channel (a per-channel group needs them all), one by one only when neither is.

Attention reads what the cache stores for every earlier token and the exact
states for the tokens of the current call, as a fused kernel would: a single
full-sequence forward is therefore unaffected, and only later calls (decoding,
chunked prefill) read quantized KV.

Sliding-window layers (Gemma 3 has five in six) attend the same tokens as
transformers' ``DynamicSlidingWindowLayer``, with the same mask sizes: the
query and the ``sliding_window - 1`` tokens before it. Tokens older than that
are forgotten (:mod:`~intactkv_modifier.kv_quant.stream`), the intact prefix
too once the window has moved past it; until then it is read in full precision.

Rows are grouped by where their quantized region starts: a row's blocks are
aligned to its own first real token, so its quantization, and its output, do
not depend on what else is in the batch or on how far it is left-padded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from intactkv_modifier.architecture import kv_geometry, text_config
from intactkv_modifier.kv_quant.attention import PackedPast, PackedRows, attach_packed_past, uses_packed_attention
from intactkv_modifier.kv_quant.settings import KVQuantSettings, TensorQuantSettings
from intactkv_modifier.kv_quant.stream import TokenStream

__all__ = ["KeyFavoredQuantizedCache", "KeyFavoredQuantizedLayer"]


@dataclass
class _RowGroup:
    """Rows of the batch whose full-precision prefix has the same length, stored together."""

    rows: torch.Tensor
    keys: TokenStream
    values: TokenStream

    def select_rows(self, local: torch.Tensor, rows: torch.Tensor) -> _RowGroup:
        local = local.to(self.rows.device)
        return _RowGroup(rows=rows.to(self.rows.device), keys=self.keys.select_rows(local),
                         values=self.values.select_rows(local))


class KeyFavoredQuantizedLayer(CacheLayerMixin):
    """One decoder layer's quantized K/V; see the module docstring for the layout.

    :param packed_attention: hand attention the stored past as it is (packed,
        :mod:`~intactkv_modifier.kv_quant.attention`) instead of dequantizing it;
        only the packed attention implementation can read that
    :param sliding_window: for a sliding-window layer, the window (the query and
        the ``sliding_window - 1`` tokens before it): attention then reads exactly
        the tokens transformers' ``DynamicSlidingWindowLayer`` keeps, with the same
        mask sizes, and the streams forget the older ones
    """

    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        key_settings: TensorQuantSettings,
        value_settings: TensorQuantSettings,
        residual_length: int,
        sliding_window: int | None = None,
        packed_attention: bool = False,
    ):
        super().__init__()
        self.packed_attention = packed_attention
        self.key_settings = key_settings
        self.value_settings = value_settings
        self.residual_length = residual_length
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.cumulative_length = 0
        self._groups: list[_RowGroup] = []

    @property
    def num_rows(self) -> int:
        return sum(group.rows.numel() for group in self._groups)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this layer stores (codes, scales, minimums, FP prefix and residual)."""
        return sum(group.keys.nbytes + group.values.nbytes for group in self._groups)

    def configure_rows(self, full_precision_lengths: Sequence[int]) -> None:
        """Set, before the first update, how many leading slots of each row stay in full precision."""
        if self.is_initialized:
            raise RuntimeError("the rows of a cache layer are configured before its first update")
        rows_by_length: dict[int, list[int]] = {}
        for row, length in enumerate(full_precision_lengths):
            rows_by_length.setdefault(length, []).append(row)
        block = math.lcm(self.key_settings.token_block, self.value_settings.token_block)
        self._groups = [
            _RowGroup(
                rows=torch.tensor(rows),
                keys=TokenStream(self.key_settings, self.residual_length, length, block),
                values=TokenStream(self.value_settings, self.residual_length, length, block),
            )
            for length, rows in rows_by_length.items()
        ]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if not self._groups:
            self.configure_rows([0] * key_states.shape[0])
        for group in self._groups:
            group.rows = group.rows.to(self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new states; return the attended past (dequantized) followed by the exact new states.

        In packed mode, after the first call: the exact new states, the first carrying the stored past.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.num_rows:
            raise ValueError(
                f"the cache holds {self.num_rows} rows but received states for {key_states.shape[0]}; "
                "a quantized cache serves one batch from prefill to the end of decoding"
            )
        single = len(self._groups) == 1
        if self.packed_attention and self.cumulative_length > 0:
            start = self.first_attended_slot()
            past = PackedPast([
                PackedRows(None if single else group.rows, group.keys.segments(start), group.values.segments(start))
                for group in self._groups
            ])
            keys, values = attach_packed_past(key_states, past), value_states
        else:
            keys, values = self._gather("keys", then=key_states), self._gather("values", then=value_states)
        self.cumulative_length += key_states.shape[-2]
        keep_from = self.first_attended_slot()
        for group in self._groups:
            group.keys.append(key_states if single else key_states.index_select(0, group.rows), keep_from)
            group.values.append(value_states if single else value_states.index_select(0, group.rows), keep_from)
        return keys, values

    def first_attended_slot(self) -> int:
        """The oldest slot the next query may attend: 0, or the start of its sliding window."""
        if self.sliding_window is None:
            return 0
        return max(0, self.cumulative_length - self.sliding_window + 1)

    def read(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The keys and values the next query reads from the cache, ``[batch, heads, tokens, head_dim]``."""
        if self.cumulative_length == 0:
            return None, None
        return self._gather("keys"), self._gather("values")

    def _gather(self, name: str, then: torch.Tensor | None = None) -> torch.Tensor | None:
        """One tensor (``keys`` or ``values``) of every group in batch order, followed by ``then``."""
        if self.cumulative_length == 0:
            return then
        start = self.first_attended_slot()
        if len(self._groups) == 1:
            return getattr(self._groups[0], name).read(start, then)
        parts = [(group.rows, getattr(group, name).read(start)) for group in self._groups]
        first = parts[0][1]
        past = first.new_empty((self.num_rows, *first.shape[1:]))
        for rows, part in parts:
            past.index_copy_(0, rows, part)
        return past if then is None else torch.cat([past, then], dim=2)

    def quantized_tokens(self) -> dict[str, list[int]]:
        """Tokens in the quantized region of each row, for keys and for values."""
        counts: dict[str, list[int]] = {"keys": [0] * self.num_rows, "values": [0] * self.num_rows}
        for group in self._groups:
            for row in group.rows.tolist():
                counts["keys"][row] = group.keys.quantized_tokens
                counts["values"][row] = group.values.quantized_tokens
        return counts

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        start = self.first_attended_slot()
        return self.cumulative_length - start + query_length, start

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def reset(self) -> None:
        self._groups = []
        self.cumulative_length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a quantized KV cache cannot drop tokens (quantized blocks cannot be split back); "
            "assisted/speculative decoding needs a DynamicCache"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(-1)
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(torch.arange(self.num_rows).repeat_interleave(repeats))

    def _select_rows(self, index: torch.Tensor) -> None:
        """Make row ``i`` a copy of former row ``index[i]``, keeping rows of a group together."""
        owner = {
            row: (g, local) for g, group in enumerate(self._groups) for local, row in enumerate(group.rows.tolist())
        }
        picked: dict[int, tuple[list[int], list[int]]] = {}
        for new_row, old_row in enumerate(index.tolist()):
            g, local = owner[old_row]
            picked.setdefault(g, ([], []))[0].append(new_row)
            picked[g][1].append(local)
        self._groups = [
            self._groups[g].select_rows(torch.tensor(locals_), torch.tensor(rows))
            for g, (rows, locals_) in sorted(picked.items())
        ]


#: The window of each supported layer type, from transformers' per-layer cache kwargs
_WINDOW_OF_LAYER_TYPE: dict[str, Callable[[dict[str, Any]], int | None]] = {
    "full_attention": lambda kwargs: None,
    "sliding_attention": lambda kwargs: kwargs["sliding_window"],
}


class KeyFavoredQuantizedCache(Cache):
    """KV cache with per-layer key/value bit widths, packed storage and a full-precision prefix.

    :param config: the model's config (one layer object is built per decoder layer)
    :param settings: bits, grouping and residual window
    :param full_precision_prefix: tokens at the start of every row, after its
        left padding, that are never quantized (the IntactKV prefix length)
    :param left_padding: leading padding slots of each row (from the attention
        mask); they are kept in full precision too, so pad slots never enter a
        quantization group and each row's blocks start at its own first token.
        Left unset, slot 0 is every row's start: then, for a left-padded batch, set
        ``full_precision_prefix = max(row start) + prefix length`` instead.
    :param packed_attention: attention reads the packed codes, without a
        dequantized copy of the past; by default when the model runs the packed
        attention implementation (what :func:`~intactkv_modifier.kv_quant.install_kv_quantization`
        installs), and ``False`` gives the reference path (dequantize, then the base attention)

    Both are settable attributes while the cache is empty (before prefill).
    """

    def __init__(
        self,
        config: PretrainedConfig,
        settings: KVQuantSettings,
        full_precision_prefix: int = 0,
        left_padding: Sequence[int] | None = None,
        packed_attention: bool | None = None,
    ):
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config(config))
        unsupported = sorted(set(layer_types) - set(_WINDOW_OF_LAYER_TYPE))
        if unsupported:
            raise ValueError(
                "KeyFavoredQuantizedCache supports full-attention and sliding-window layers; "
                f"this model also has {unsupported}"
            )
        geometry = kv_geometry(config)
        settings.check_model(geometry)
        layers = [
            KeyFavoredQuantizedLayer(
                *settings.for_layer(index),
                settings.residual_length,
                sliding_window=_WINDOW_OF_LAYER_TYPE[layer_type](layer_kwargs),
                packed_attention=uses_packed_attention(config) if packed_attention is None else packed_attention,
            )
            for index, layer_type in zip(range(geometry.num_layers), layer_types)
        ]
        super().__init__(layers=layers)
        self.settings = settings
        self._full_precision_prefix = 0
        self._left_padding: list[int] | None = None
        self.full_precision_prefix = full_precision_prefix
        self.left_padding = left_padding

    @property
    def full_precision_prefix(self) -> int:
        return self._full_precision_prefix

    @full_precision_prefix.setter
    def full_precision_prefix(self, value: int) -> None:
        self._check_empty("full_precision_prefix")
        if value < 0:
            raise ValueError(f"full_precision_prefix must be >= 0, got {value}")
        self._full_precision_prefix = int(value)

    @property
    def left_padding(self) -> list[int] | None:
        return None if self._left_padding is None else list(self._left_padding)

    @left_padding.setter
    def left_padding(self, value: Sequence[int] | None) -> None:
        self._check_empty("left_padding")
        if value is not None and any(pad < 0 for pad in value):
            raise ValueError(f"left_padding must be non-negative, got {list(value)}")
        self._left_padding = None if value is None else [int(pad) for pad in value]

    def full_precision_lengths(self, batch_size: int) -> list[int]:
        """Leading slots of each row kept in full precision: its padding plus the prefix."""
        padding = self._left_padding if self._left_padding is not None else [0] * batch_size
        if len(padding) != batch_size:
            raise ValueError(f"left_padding has {len(padding)} rows but the batch has {batch_size}")
        return [pad + self._full_precision_prefix for pad in padding]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.configure_rows(self.full_precision_lengths(key_states.shape[0]))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds, over all layers and rows."""
        return sum(layer.nbytes for layer in self.layers)

    def _check_empty(self, name: str) -> None:
        if self.get_seq_length() > 0:
            raise RuntimeError(f"`{name}` can only change while the cache is empty (before prefill)")
