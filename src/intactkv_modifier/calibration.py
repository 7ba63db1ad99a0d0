"""IntactKV calibration: fit the stored prefix K/V so the quantized model matches the FP one.

Following the IntactKV paper's "+Cal" step, the prefix keys and values are the
only trainable tensors, and the loss compares hidden states of the quantized
model (with the spliced prefix) with the full-precision model's, on the tokens
after the prefix. Two losses are offered: the MSE of the final hidden states
(``final_hidden``, cheap to record), and the reference implementation's sum over
every decoder layer's output of MSE/2 (``every_layer``). Targets are hidden
states, not logits: they are ``hidden_size`` wide instead of ``vocab_size``
wide, and they are recorded while the weights are still full precision, so no
second model is ever held in memory. Each sample keeps ``tokens x hidden_size``
values per recorded output in the model dtype on the CPU (a 512-token sample of
a 4096-wide model in bf16: 4 MiB per output).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from compressed_tensors.offload import get_execution_device
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from intactkv_modifier.architecture import decoder_stack
from intactkv_modifier.capture import full_precision_forward
from intactkv_modifier.prefix_kv import PrefixKV
from intactkv_modifier.runtime import IntactKVRuntime
from intactkv_modifier.storage import prefix_kv_of

__all__ = ["CalibrationSettings", "CalibrationTargets", "calibrate_prefix_kv", "prefix_mse", "record_targets"]


CalibrationLoss = Literal["final_hidden", "every_layer"]


class CalibrationSettings(BaseModel):
    """How to fit the prefix K/V: 128 samples, AdamW, lr 2e-4, 20 epochs by default.

    ``batch_size`` > 1 trades optimizer steps for GPU throughput: a forward then
    averages the loss of up to ``batch_size`` samples of equal length (samples are
    never padded, so none of the loss comes from padding). ``gradient_accumulation``
    batches make one optimizer step, ``warmup_ratio`` of the steps ramp the learning
    rate up linearly, and ``max_grad_norm`` clips the gradient before each step.
    :meth:`reference` gives the IntactKV reference implementation's settings.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_samples: int = Field(default=128, gt=0)
    epochs: int = Field(default=20, gt=0)
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=1, gt=0)
    loss: CalibrationLoss = "final_hidden"
    gradient_accumulation: int = Field(default=1, gt=0)
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    max_grad_norm: float | None = Field(default=None, gt=0)
    seed: int = 0

    @classmethod
    def reference(cls, **overrides: object) -> CalibrationSettings:
        """ruikangliu/IntactKV's +Cal: every layer's output, batch 1 x 16 accumulated, 3 % warm-up, clip 0.3."""
        settings = dict(loss="every_layer", gradient_accumulation=16, warmup_ratio=0.03, max_grad_norm=0.3)
        return cls(**{**settings, **overrides})


@dataclass
class CalibrationTargets:
    """Samples that start with the prefix, and the FP model's hidden states on them.

    ``hidden_states[i]`` is ``[outputs, tokens, hidden]``: the final hidden state alone
    (``final_hidden``) or every decoder layer's output (``every_layer``).
    """

    input_ids: list[torch.Tensor]
    hidden_states: list[torch.Tensor]
    prefix_length: int
    loss: CalibrationLoss = "final_hidden"

    def __len__(self) -> int:
        return len(self.input_ids)


def record_targets(
    model: torch.nn.Module,
    batches: Iterable[dict],
    prefix_token_ids: list[int],
    num_samples: int,
    loss: CalibrationLoss = "final_hidden",
) -> CalibrationTargets:
    """Run the full-precision model on the first ``num_samples`` samples that start with the prefix."""
    prefix = torch.tensor(prefix_token_ids)
    samples: list[torch.Tensor] = []
    skipped = 0
    for row in _rows(batches):
        if len(samples) == num_samples:
            break
        if row.numel() > prefix.numel() and torch.equal(row[: prefix.numel()], prefix):
            samples.append(row)
        else:
            skipped += 1
    if len(samples) < num_samples:
        raise ValueError(
            f"IntactKV calibration asked for {num_samples} samples but the calibration data holds only "
            f"{len(samples)} that start with the prefix {prefix_token_ids} ({skipped} others skipped); lower "
            "`calibration.num_samples` or pass more calibration samples to oneshot."
        )
    if skipped:
        logger.warning(f"IntactKV calibration: skipped {skipped} samples that do not start with the prefix")

    hidden = []
    with full_precision_forward(model), torch.no_grad():
        for ids in tqdm(samples, desc="IntactKV: recording FP targets"):
            hidden.append(_hidden_states(model, ids.unsqueeze(0), loss)[:, 0].cpu())
    return CalibrationTargets(input_ids=samples, hidden_states=hidden, prefix_length=prefix.numel(), loss=loss)


def prefix_mse(model: torch.nn.Module, targets: CalibrationTargets) -> float:
    """Mean loss of the model as it is now (spliced prefix included) on ``targets``; no gradients."""
    with torch.no_grad():
        losses = [float(_batch_loss(model, targets, [index])) for index in range(len(targets))]
    return sum(losses) / len(losses)


def calibrate_prefix_kv(
    model: torch.nn.Module, targets: CalibrationTargets, settings: CalibrationSettings
) -> PrefixKV:
    """Fit the model's stored prefix K/V to ``targets``; returns the fitted K/V in the stored dtype.

    bf16/fp16 tensors would swallow AdamW steps of lr 2e-4 (their spacing near 1
    is 2**-7 and 2**-10), so float32 masters are trained and cast back at the end.
    """
    runtime = IntactKVRuntime.of(model)
    if runtime is None:
        raise ValueError("the model has no intact prefix KV to calibrate; attach one first")
    stored = prefix_kv_of(model)
    dtype = stored.keys[0].dtype
    keys = [k.detach().float().clone().requires_grad_(True) for k in stored.keys]
    values = [v.detach().float().clone().requires_grad_(True) for v in stored.values]
    parameters = keys + values
    if targets.loss != settings.loss:
        raise ValueError(
            f"the targets were recorded for the {targets.loss!r} loss, the settings ask for {settings.loss!r}"
        )
    generator = torch.Generator().manual_seed(settings.seed)
    epochs = [
        _equal_length_batches(targets, torch.randperm(len(targets), generator=generator).tolist(), settings.batch_size)
        for _ in range(settings.epochs)
    ]
    accumulation = settings.gradient_accumulation
    total_steps = sum(math.ceil(len(batches) / accumulation) for batches in epochs)
    warmup_steps = math.ceil(settings.warmup_ratio * total_steps)
    with _frozen_weights(model), runtime.overridden(keys, values):
        optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup_steps + 1)))
        for epoch, batches in enumerate(epochs):
            progress = tqdm(batches, desc=f"IntactKV calibration epoch {epoch + 1}/{settings.epochs}", leave=False)
            total = 0.0
            for position, batch in enumerate(progress):
                loss = _batch_loss(model, targets, batch)
                if not loss.requires_grad:
                    raise RuntimeError(
                        "IntactKV calibration gets no gradient through this quantized model (fake-quantized "
                        "activations, as in W8A8 schemes, stop it); calibrate with a weight-only scheme, or drop "
                        "`calibration` to keep the captured full-precision prefix KV."
                    )
                (loss / min(accumulation, len(batches) - position // accumulation * accumulation)).backward()
                if (position + 1) % accumulation == 0 or position + 1 == len(batches):
                    if settings.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                total += loss.item() * len(batch)
                progress.set_postfix(loss=f"{loss.item():.4g}")
            mean = total / len(targets)
            logger.info(f"IntactKV calibration epoch {epoch + 1}/{settings.epochs}: mean loss {mean:.6g}")
    return PrefixKV(keys=[k.detach().to(dtype) for k in keys], values=[v.detach().to(dtype) for v in values])


def _equal_length_batches(targets: CalibrationTargets, order: list[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into batches of at most ``batch_size`` samples of one length, in order of first appearance."""
    open_batches: dict[int, list[int]] = {}
    batches: list[list[int]] = []
    for index in order:
        batch = open_batches.setdefault(targets.input_ids[index].numel(), [])
        if not batch:
            batches.append(batch)
        batch.append(index)
        if len(batch) == batch_size:
            del open_batches[targets.input_ids[index].numel()]
    return batches


def _batch_loss(model: torch.nn.Module, targets: CalibrationTargets, batch: list[int]) -> torch.Tensor:
    """The loss after the prefix over samples ``batch`` (all of one length).

    ``final_hidden``: MSE of the final hidden states. ``every_layer``: the sum over decoder
    layers of each layer output's MSE / 2, as the reference implementation computes it.
    """
    ids = torch.stack([targets.input_ids[i] for i in batch])
    hidden = _hidden_states(model, ids, targets.loss)
    target = torch.stack([targets.hidden_states[i] for i in batch], dim=1).to(hidden.device, torch.float32)
    start = targets.prefix_length
    errors = (hidden[:, :, start:].float() - target[:, :, start:]).pow(2).flatten(1).mean(dim=1)
    return errors[0] if targets.loss == "final_hidden" else errors.sum() / 2


def _hidden_states(model: torch.nn.Module, ids: torch.Tensor, loss: CalibrationLoss) -> torch.Tensor:
    """``[outputs, batch, tokens, hidden]``: the final hidden state, or every decoder layer's output."""
    decoder = decoder_stack(model)
    ids = ids.to(get_execution_device(decoder))
    if loss == "final_hidden":
        return decoder(input_ids=ids, use_cache=False).last_hidden_state.unsqueeze(0)
    outputs: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(keep) for layer in decoder.layers]
    try:
        decoder(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(outputs)


def _rows(batches: Iterable[dict]) -> Iterator[torch.Tensor]:
    """Unpadded token rows of a calibration dataloader (left or right padding removed)."""
    for batch in batches:
        ids = torch.as_tensor(batch["input_ids"])
        mask = torch.as_tensor(batch.get("attention_mask", torch.ones_like(ids)))
        if ids.dim() == 1:
            ids, mask = ids.unsqueeze(0), mask.unsqueeze(0)
        for row, row_mask in zip(ids, mask):
            yield row[row_mask.bool()].cpu()


@contextmanager
def _frozen_weights(model: torch.nn.Module) -> Iterator[None]:
    """No weight takes gradients while the prefix is fitted; each flag is restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
