"""The quality of a saved IntactKV checkpoint: perplexity without and with its intact prefix.

Both numbers come from the *reloaded* checkpoint, the one a user ships, on the
same windows: "quantized" with the prefix switched off
(:func:`~intactkv_modifier.intact_kv_disabled`), "+IntactKV" as loaded. With a
full-precision reference model the report adds its perplexity and the share of
the FP-to-quantized gap that IntactKV closes. The example, the main job and
``intactkv eval`` all print this report. :func:`evaluate_chat_checkpoint` is the
same comparison on conversations (:mod:`.chat_eval`), for chat models.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from intactkv_modifier.checkpoint import read_config_block
from intactkv_modifier.eval.chat_eval import ChatEvalSizes, ChatScores, build_chat_eval_set, score_chat
from intactkv_modifier.eval.perplexity import perplexity
from intactkv_modifier.runtime import intact_kv_disabled
from intactkv_modifier.storage import config_of

__all__ = ["ChatCheckpointQuality", "CheckpointQuality", "Scorer", "evaluate_chat_checkpoint", "evaluate_checkpoint",
           "gap_closed"]

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
        return gap_closed(self.fp, self.quantized, self.intactkv)

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


@dataclass(frozen=True)
class ChatCheckpointQuality:
    """Chat scores of the reloaded checkpoint without and with IntactKV, of the FP reference if given, and the
    sizes of the held-out set they were measured on (``eval_set``: samples and scored tokens per part)."""

    quantized: ChatScores
    intactkv: ChatScores
    fp: ChatScores | None
    eval_set: dict[str, int]
    prefix_length: int

    @property
    def gap_closed(self) -> float | None:
        """Share of the FP-to-quantized single-turn assistant perplexity gap IntactKV closes."""
        if self.fp is None:
            return None
        return gap_closed(self.fp.single_turn_ppl, self.quantized.single_turn_ppl, self.intactkv.single_turn_ppl)


def evaluate_chat_checkpoint(
    checkpoint: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase, reference: str | os.PathLike[str] | None,
    sizes: ChatEvalSizes | None = None, system_prompt: str | None = None, seed: int = 0, batch_size: int = 8,
) -> ChatCheckpointQuality:
    """The chat evaluation of ``checkpoint`` (float32) with IntactKV off and on, on conversations that start with
    its stored prefix; with ``reference`` (kept in memory beside the checkpoint for the KL) also the FP scores."""
    config = read_config_block(checkpoint)
    if config is None:
        raise ValueError(f"{checkpoint} carries no IntactKV prefix (no `intactkv_config` in its config.json)")
    fp_model = None
    if reference is not None:
        fp_model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    eval_set = build_chat_eval_set(
        tokenizer, config.prefix_token_ids, fp_model, system_prompt, sizes, seed, batch_size
    )
    fp = score_chat(fp_model, eval_set, None, batch_size) if fp_model is not None else None
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with intact_kv_disabled(model):
        quantized = score_chat(model, eval_set, fp_model, batch_size)
    intactkv = score_chat(model, eval_set, fp_model, batch_size)
    return ChatCheckpointQuality(quantized, intactkv, fp, eval_set.describe(), len(config.prefix_token_ids))


def gap_closed(fp: float | None, quantized: float, improved: float) -> float | None:
    """Share of the FP-to-quantized gap (perplexity, or any lower-is-better score) that ``improved`` closes."""
    if fp is None or quantized <= fp:
        return None
    return (quantized - improved) / (quantized - fp)
