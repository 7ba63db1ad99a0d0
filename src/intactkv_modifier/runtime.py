"""Splicing the stored prefix K/V into the KV a model computes, at prefill.

The splice happens where the attention layer hands its fresh post-RoPE keys and
values to the cache (``past_key_values.update``): the slice that belongs to the
prefix is replaced before it is stored or attended to. So the stored KV is used
by the prefill itself, stays in the cache for every decoding step, works with
any cache class and with ``use_cache=False``, and costs nothing afterwards.

A row gets the stored KV only when it provably starts with the prefix at
positions ``0..P-1`` (left padding allowed); any other row runs unchanged, so a
prompt IntactKV does not apply to is never answered wrongly.

Everything that belongs to one call (the splice plan, which layers applied it)
and the switches :func:`intact_kv_disabled` and
:meth:`IntactKVRuntime.overridden` live in context variables, so threads (and
asyncio tasks) that share one model never see each other's plan or switches.
A thread started inside ``intact_kv_disabled`` does not inherit it (Python
starts threads with an empty context); run it with ``contextvars.copy_context().run``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from loguru import logger

from intactkv_modifier.architecture import attention_modules, decoder_stack, kv_geometry
from intactkv_modifier.config import KEY_BUFFER, VALUE_BUFFER
from intactkv_modifier.padding import first_attended_positions

__all__ = ["IntactKVRuntime", "intact_kv_disabled", "splice_prefix"]


@dataclass(frozen=True)
class SplicePlan:
    """Rows of the current prefill that start with the prefix, and where it starts in each."""

    rows: tuple[int, ...]
    starts: tuple[int, ...]
    batch_size: int

    @property
    def covers_batch_at_zero(self) -> bool:
        return len(self.rows) == self.batch_size and not any(self.starts)


def splice_prefix(states: torch.Tensor, prefix: torch.Tensor, plan: SplicePlan) -> torch.Tensor:
    """Replace each planned row's prefix slice of ``states`` ``[B, H, T, D]`` by ``prefix`` ``[H, P, D]``.

    Out of place, so gradients reach ``prefix`` when it is being calibrated.
    """
    prefix = prefix.to(device=states.device, dtype=states.dtype)
    length = prefix.shape[1]
    if plan.covers_batch_at_zero:
        batch_prefix = prefix.unsqueeze(0).expand(states.shape[0], -1, -1, -1)
        return torch.cat([batch_prefix, states[:, :, length:]], dim=2)
    spliced = states.clone()
    for row, start in zip(plan.rows, plan.starts):
        spliced[row, :, start : start + length] = prefix
    return spliced


@dataclass
class _CallState:
    """One prefill's plan, and the layers that have applied it (each must, once the decoder returns)."""

    plan: SplicePlan
    spliced: set[int] = field(default_factory=set)


class _SplicingCache:
    """Stands in for ``past_key_values`` inside one attention call during a planned prefill."""

    def __init__(
        self,
        inner: Any,
        prefix_key: torch.Tensor,
        prefix_value: torch.Tensor,
        plan: SplicePlan,
        on_update: Callable[[int], None],
    ):
        self._inner = inner
        self._prefix_key = prefix_key
        self._prefix_value = prefix_value
        self._plan = plan
        self._on_update = on_update

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._on_update(layer_idx)
        key_states = splice_prefix(key_states, self._prefix_key, self._plan)
        value_states = splice_prefix(value_states, self._prefix_value, self._plan)
        if self._inner is None:
            return key_states, value_states
        return self._inner.update(key_states, value_states, layer_idx, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if self._inner is None:
            raise AttributeError(f"IntactKV splices without a cache; `{name}` is not available")
        return getattr(self._inner, name)


_RUNTIME_IDS = itertools.count()


class IntactKVRuntime:
    """The hooks that make a model use its stored prefix K/V. One per decoder stack."""

    ATTRIBUTE = "_intactkv_runtime"

    def __init__(self, decoder: torch.nn.Module, attentions: list[torch.nn.Module], prefix_token_ids: list[int]):
        self.prefix_token_ids = list(prefix_token_ids)
        self._new_context_variables()
        self._kv_shape: tuple[int, int] | None = None
        self._warned = False
        self._checked_buffers = False
        self._attentions = attentions
        decoder.register_forward_pre_hook(self._plan_prefill, with_kwargs=True)
        decoder.register_forward_hook(self._end_forward, always_call=True)
        for attention in attentions:
            attention.register_forward_pre_hook(self._wrap_cache, with_kwargs=True)

    def _new_context_variables(self) -> None:
        name = f"intactkv_runtime_{next(_RUNTIME_IDS)}"
        self._call: ContextVar[_CallState | None] = ContextVar(f"{name}_call", default=None)
        self._enabled: ContextVar[bool] = ContextVar(f"{name}_enabled", default=True)
        self._override: ContextVar[tuple[list[torch.Tensor], list[torch.Tensor]] | None] = ContextVar(
            f"{name}_override", default=None
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> IntactKVRuntime:
        """A copied model's hooks get a runtime of their own: the copy's layers, fresh per-call state."""
        duplicate = copy.copy(self)
        memo[id(self)] = duplicate
        duplicate._attentions = copy.deepcopy(self._attentions, memo)
        duplicate._new_context_variables()
        return duplicate

    @classmethod
    def install(cls, model: torch.nn.Module, prefix_token_ids: list[int]) -> IntactKVRuntime:
        """Install once per decoder stack; a second call updates the prefix of the existing runtime."""
        decoder = decoder_stack(model)
        runtime = getattr(decoder, cls.ATTRIBUTE, None)
        if runtime is None:
            runtime = cls(decoder, attention_modules(model), prefix_token_ids)
            geometry = kv_geometry(model.config)
            runtime._kv_shape = (geometry.num_key_value_heads, geometry.head_dim)
            object.__setattr__(decoder, cls.ATTRIBUTE, runtime)
        else:
            runtime.prefix_token_ids = list(prefix_token_ids)
        return runtime

    @classmethod
    def of(cls, model: torch.nn.Module) -> IntactKVRuntime | None:
        return getattr(decoder_stack(model), cls.ATTRIBUTE, None)

    @classmethod
    def uninstall(cls, model: torch.nn.Module) -> None:
        """Remove the runtime and its hooks, so the model computes as if none had been installed.

        Hooks are found by their owner, not by handles, because a copied model's
        hooks belong to the copy's runtime (:meth:`__deepcopy__`).
        """
        decoder = decoder_stack(model)
        runtime = getattr(decoder, cls.ATTRIBUTE, None)
        if runtime is None:
            return
        for module in (decoder, *runtime._attentions):
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                for key in [key for key, hook in hooks.items() if getattr(hook, "__self__", None) is runtime]:
                    del hooks[key]
                    for flags in (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs,
                                  module._forward_hooks_always_called):
                        flags.pop(key, None)
        object.__delattr__(decoder, cls.ATTRIBUTE)

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """No splicing for calls made in this context (this thread or task) until the block ends."""
        token = self._enabled.set(False)
        try:
            yield
        finally:
            self._enabled.reset(token)

    @contextmanager
    def overridden(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> Iterator[None]:
        """Splice these tensors instead of the buffers, e.g. trainable masters during calibration.

        Buffers of an offloaded model are copied on every access, so gradients
        could never reach them; these tensors are used as they are.
        """
        token = self._override.set((keys, values))
        try:
            yield
        finally:
            self._override.reset(token)

    # hooks -----------------------------------------------------------------

    def _plan_prefill(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._call.set(None)
        if not self._enabled.get():
            return
        past = kwargs.get("past_key_values")
        if past is not None and past.get_seq_length() > 0:
            return  # decoding: the prefix KV was spliced in at prefill and lives in the cache
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            self._report("the model was called with inputs_embeds, which IntactKV cannot match to the prefix")
            return
        self._check_buffers()
        plan = self._match_rows(input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        unmatched = input_ids.shape[0] - len(plan.rows)
        if unmatched:
            self._report(
                f"{unmatched} of {input_ids.shape[0]} prompts do not start with the stored prefix "
                f"{self.prefix_token_ids} at positions 0..{len(self.prefix_token_ids) - 1}; "
                "they run without IntactKV"
            )
        if plan.rows:
            self._call.set(_CallState(plan))

    def _end_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        state = self._call.get()
        self._call.set(None)
        if state is None or output is None:  # no plan, or the forward raised (its error is the one to see)
            return
        skipped = sorted({a.layer_idx for a in self._attentions} - state.spliced)
        if skipped:
            raise RuntimeError(
                f"IntactKV: attention layers {skipped} never wrote their KV through the `past_key_values` argument, "
                "so the stored prefix K/V were not applied to them; this architecture hands the cache to attention "
                "in another way, which IntactKV does not support."
            )

    def _wrap_cache(self, attention: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self._call.get()
        if state is None:
            return None
        override = self._override.get()
        if override is not None:
            keys, values = override
            key, value = keys[attention.layer_idx], values[attention.layer_idx]
        else:
            key, value = getattr(attention, KEY_BUFFER), getattr(attention, VALUE_BUFFER)
        kwargs["past_key_values"] = _SplicingCache(
            kwargs.get("past_key_values"), key, value, state.plan, state.spliced.add
        )
        return args, kwargs

    # helpers ---------------------------------------------------------------

    def _match_rows(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> SplicePlan:
        batch, length = input_ids.shape
        prefix = torch.tensor(self.prefix_token_ids, device=input_ids.device)
        size = prefix.numel()
        if length < size:
            return SplicePlan(rows=(), starts=(), batch_size=batch)

        if attention_mask is not None and attention_mask.dim() == 2:
            mask = attention_mask.bool()
            starts = first_attended_positions(attention_mask)
        else:
            mask = None
            starts = torch.zeros(batch, dtype=torch.long, device=input_ids.device)

        rows, row_starts = [], []
        for row, start in enumerate(starts.tolist()):
            if start + size > length or not torch.equal(input_ids[row, start : start + size], prefix):
                continue
            if mask is not None and not bool(mask[row, start : start + size].all()):
                continue
            if not self._prefix_at_first_positions(position_ids, row, start, size):
                continue
            rows.append(row)
            row_starts.append(start)
        return SplicePlan(rows=tuple(rows), starts=tuple(row_starts), batch_size=batch)

    @staticmethod
    def _prefix_at_first_positions(position_ids: torch.Tensor | None, row: int, start: int, size: int) -> bool:
        """The stored keys carry RoPE for positions 0..P-1, so the prefix must sit exactly there."""
        if position_ids is None or position_ids.dim() != 2:
            return start == 0
        positions = position_ids[row if position_ids.shape[0] > 1 else 0, start : start + size]
        return torch.equal(positions, torch.arange(size, device=positions.device, dtype=positions.dtype))

    def _check_buffers(self) -> None:
        if self._checked_buffers:
            return
        for attention in self._attentions:
            for name in (KEY_BUFFER, VALUE_BUFFER):
                tensor = getattr(attention, name)
                expected = self._expected_shape()
                if expected is not None and tuple(tensor.shape) != expected:
                    raise RuntimeError(
                        f"IntactKV tensor `{name}` of layer {attention.layer_idx} has shape {tuple(tensor.shape)}, "
                        f"but the config block declares {expected} ({len(self.prefix_token_ids)} prefix tokens); "
                        "the checkpoint's prefix KV does not match its config."
                    )
                if tensor.is_meta or not bool(torch.isfinite(tensor).all()):
                    raise RuntimeError(
                        f"IntactKV tensor `{name}` of layer {attention.layer_idx} was not loaded (missing or "
                        "non-finite); the checkpoint's config announces IntactKV but its weights lack the prefix KV."
                    )
        self._checked_buffers = True

    def _expected_shape(self) -> tuple[int, int, int] | None:
        if self._kv_shape is None:
            return None
        heads, head_dim = self._kv_shape
        return (heads, len(self.prefix_token_ids), head_dim)

    def _report(self, message: str) -> None:
        """Every call at DEBUG, so each one can be traced; the first of the model's life also at WARNING."""
        if self._warned:
            logger.debug(f"IntactKV: {message}.")
        else:
            self._warned = True
            logger.warning(f"IntactKV: {message} (later calls report this at DEBUG level).")


@contextmanager
def intact_kv_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as if it had no intact prefix KV: the plain quantized baseline, same weights."""
    runtime = IntactKVRuntime.of(model)
    if runtime is None:
        yield
        return
    with runtime.suspended():
        yield
