"""IntactKV calibration: fit the stored prefix K/V so the quantized model matches the FP one.

Following the IntactKV paper's "+Cal" step, the prefix keys and values are the
only trainable tensors; the loss is the mean squared error between the final
layer's hidden states of the quantized model (with the spliced prefix) and of
the full-precision model, on the tokens after the prefix. Targets are the final
hidden states, not logits: they are ``hidden_size`` wide instead of
``vocab_size`` wide, and they are recorded while the weights are still full
precision, so no second model is ever held in memory. Each sample keeps
``tokens x hidden_size`` values in the model dtype on the CPU (a 512-token
sample of a 4096-wide model in bf16: 4 MiB; 128 of them: 512 MiB).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from compressed_tensors.offload import get_execution_device
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from intactkv_modifier.architecture import decoder_stack
from intactkv_modifier.capture import PrefixKV, full_precision_forward
from intactkv_modifier.runtime import IntactKVRuntime
from intactkv_modifier.storage import prefix_kv_of

__all__ = ["CalibrationSettings", "CalibrationTargets", "calibrate_prefix_kv", "prefix_mse", "record_targets"]


class CalibrationSettings(BaseModel):
    """How to fit the prefix K/V. Defaults are the paper's: 128 samples, AdamW, lr 2e-4, 20 epochs, one sample a step.

    ``batch_size`` > 1 trades optimizer steps for GPU throughput: a step then
    averages the loss of up to ``batch_size`` samples of equal length (samples are
    never padded, so none of the loss comes from padding).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_samples: int = Field(default=128, gt=0)
    epochs: int = Field(default=20, gt=0)
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=1, gt=0)
    seed: int = 0


@dataclass
class CalibrationTargets:
    """Samples that start with the prefix, and the FP model's final hidden states on them."""

    input_ids: list[torch.Tensor]
    hidden_states: list[torch.Tensor]
    prefix_length: int

    def __len__(self) -> int:
        return len(self.input_ids)


def record_targets(
    model: torch.nn.Module, batches: Iterable[dict], prefix_token_ids: list[int], num_samples: int
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

    decoder = decoder_stack(model)
    device = get_execution_device(decoder)
    hidden = []
    with full_precision_forward(model):
        for ids in tqdm(samples, desc="IntactKV: recording FP targets"):
            output = decoder(input_ids=ids.unsqueeze(0).to(device), use_cache=False)
            hidden.append(output.last_hidden_state[0].detach().cpu())
    return CalibrationTargets(input_ids=samples, hidden_states=hidden, prefix_length=prefix.numel())


def prefix_mse(model: torch.nn.Module, targets: CalibrationTargets) -> float:
    """Mean loss of the model as it is now (spliced prefix included) on ``targets``; no gradients."""
    with torch.no_grad():
        losses = [
            float(_batch_loss(model, [ids], [target], targets.prefix_length))
            for ids, target in zip(targets.input_ids, targets.hidden_states)
        ]
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
    generator = torch.Generator().manual_seed(settings.seed)
    with _frozen_weights(model), runtime.overridden(keys, values):
        optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
        for epoch in range(settings.epochs):
            batches = _equal_length_batches(targets, torch.randperm(len(targets), generator=generator).tolist(),
                                            settings.batch_size)
            progress = tqdm(batches, desc=f"IntactKV calibration epoch {epoch + 1}/{settings.epochs}", leave=False)
            total = 0.0
            for batch in progress:
                loss = _batch_loss(
                    model,
                    [targets.input_ids[i] for i in batch],
                    [targets.hidden_states[i] for i in batch],
                    targets.prefix_length,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
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


def _batch_loss(
    model: torch.nn.Module, ids: list[torch.Tensor], targets: list[torch.Tensor], prefix_length: int
) -> torch.Tensor:
    """MSE of the final hidden states after the prefix, over samples of one length."""
    decoder = decoder_stack(model)
    device = get_execution_device(decoder)
    hidden = decoder(input_ids=torch.stack(ids).to(device), use_cache=False).last_hidden_state
    target = torch.stack(targets).to(device=device, dtype=torch.float32)
    return torch.nn.functional.mse_loss(hidden[:, prefix_length:].float(), target[:, prefix_length:])


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
