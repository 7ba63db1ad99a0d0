"""The quality of a saved IntactKV checkpoint: perplexity without and with its intact prefix.

Both numbers come from the *reloaded* checkpoint, the one a user ships, on the
same windows: "quantized" with the prefix switched off
(:func:`~intactkv_modifier.intact_kv_disabled`), "+IntactKV" as loaded. With a
full-precision reference model the report adds its perplexity and the share of
the FP-to-quantized gap that IntactKV closes. The example, the main job and
``intactkv eval`` all print this report.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from intactkv_modifier.eval.perplexity import perplexity
from intactkv_modifier.runtime import intact_kv_disabled
from intactkv_modifier.storage import config_of

__all__ = ["CheckpointQuality", "Scorer", "evaluate_checkpoint"]

#: Perplexity of a model on windows, the label naming the row (for a progress display).
Scorer = Callable[[PreTrainedModel, torch.Tensor, str], float]


def _plain_perplexity(model: PreTrainedModel, windows: torch.Tensor, label: str) -> float:
    return perplexity(model, windows, desc=label)


@dataclass(frozen=True)
class CheckpointQuality:
    """Perplexities on ``windows`` windows of ``window_length`` tokens; ``fp`` only with a reference model."""

    windows: int
    window_length: int
    quantized: float
    intactkv: float
    fp: float | None = None

    @property
    def gap_closed(self) -> float | None:
        """Share of the FP-to-quantized perplexity gap IntactKV closes; None without FP or without a gap."""
        if self.fp is None or self.quantized <= self.fp:
            return None
        return (self.quantized - self.intactkv) / (self.quantized - self.fp)

    def rows(self) -> list[tuple[str, float]]:
        fp = [] if self.fp is None else [("FP (reference)", self.fp)]
        return [*fp, ("quantized (IntactKV off)", self.quantized), ("quantized + IntactKV", self.intactkv)]

    def markdown(self, heading: str) -> str:
        lines = [heading, "", "| model | perplexity |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in self.rows()]
        if self.gap_closed is not None:
            lines += ["", f"IntactKV closes {self.gap_closed:.1%} of the FP→quantized perplexity gap."]
        return "\n".join(lines)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    windows: torch.Tensor,
    reference: str | os.PathLike[str] | None = None,
    score: Scorer = _plain_perplexity,
) -> CheckpointQuality:
    """Reload ``checkpoint`` in float32 and score it without and with IntactKV (and ``reference`` if given).

    Each model is freed before the next loads, so at most one is in memory.
    """
    quantized, intactkv = _score_checkpoint(checkpoint, windows, score)
    fp = None
    if reference is not None:
        model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
        fp = score(model, windows, "FP")
        del model
    return CheckpointQuality(
        windows=windows.shape[0], window_length=windows.shape[1], quantized=quantized, intactkv=intactkv, fp=fp
    )


def _score_checkpoint(
    checkpoint: str | os.PathLike[str], windows: torch.Tensor, score: Scorer
) -> tuple[float, float]:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if config_of(model) is None:
        raise ValueError(f"{checkpoint} carries no IntactKV prefix (no `intactkv_config` in its config.json)")
    with intact_kv_disabled(model):
        quantized = score(model, windows, "quantized")
    return quantized, score(model, windows, "quantized + IntactKV")
