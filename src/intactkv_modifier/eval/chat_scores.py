"""Scores of a chat model on conversations: assistant-turn perplexity, and agreement with the FP model.

Perplexity counts only the scored tokens of each sample (the assistant's answers and
their end-of-turn tokens, see :mod:`.chat_samples`). Agreement follows the IntactKV
paper's view that a quantized model should behave like its full-precision model:
along answers the FP model itself chose greedily, the mean KL divergence
KL(P_FP || P_quantized) of the next-token distributions and the share of positions
where both models' most likely token is the same (top-1 agreement), over the
positions that predict the answer tokens and the end-of-turn token the FP model
produced. Samples of unequal length are right-padded into batches; padding is never
scored and never attended to.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from intactkv_modifier.eval.chat_samples import ChatSample
from intactkv_modifier.eval.perplexity import target_logits

__all__ = ["Agreement", "agreement", "assistant_perplexity", "greedy_answers"]


@dataclass(frozen=True)
class Agreement:
    """Mean KL(P_FP || P_model) in nats and top-1 agreement over ``positions`` scored positions."""

    kl: float
    top1: float
    positions: int


@torch.no_grad()
def assistant_perplexity(model: PreTrainedModel, samples: list[ChatSample], batch_size: int = 8) -> float:
    """exp(mean NLL) over the scored tokens of every sample."""
    total, count = 0.0, 0
    for ids, mask, targets in _batches(samples, batch_size):
        for logits, labels in target_logits(model, ids, mask, targets):
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            count += labels.numel()
    return math.exp(total / count)


@torch.no_grad()
def agreement(
    model: PreTrainedModel, reference: PreTrainedModel, samples: list[ChatSample], batch_size: int = 8
) -> Agreement:
    """KL to ``reference`` and top-1 agreement with it on the scored positions of ``samples``."""
    kl_sum, same, count = 0.0, 0, 0
    for ids, mask, targets in _batches(samples, batch_size):
        chunks = zip(target_logits(model, ids, mask, targets), target_logits(reference, ids, mask, targets))
        for (logits, _), (reference_logits, _) in chunks:
            log_q = torch.log_softmax(logits, dim=-1)
            log_p = torch.log_softmax(reference_logits.to(log_q.device), dim=-1)
            kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
            same += int((log_q.argmax(dim=-1) == log_p.argmax(dim=-1)).sum())
            count += log_q.shape[0]
    return Agreement(kl=kl_sum / count, top1=same / count, positions=count)


@torch.no_grad()
def greedy_answers(
    reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[torch.Tensor],
    max_new_tokens: int, batch_size: int = 8,
) -> list[ChatSample]:
    """Each prompt followed by ``reference``'s greedy answer up to its end-of-turn token (kept, and scored) or
    ``max_new_tokens``; the answer's tokens are the scored ones."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    samples = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(prompt.numel() for prompt in batch)
        ids = torch.stack([torch.cat([torch.full((width - p.numel(),), pad), p]) for p in batch])
        mask = torch.stack([torch.cat([torch.zeros(width - p.numel()), torch.ones(p.numel())]) for p in batch])
        device = reference.get_input_embeddings().weight.device
        output = reference.generate(
            input_ids=ids.to(device), attention_mask=mask.long().to(device), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=eos, pad_token_id=pad, top_p=None, top_k=None, temperature=None,
        )
        for prompt, new in zip(batch, output[:, width:].cpu()):
            answer = _until_end_of_turn(new, eos)
            scored = torch.cat([torch.zeros(prompt.numel()), torch.ones(answer.numel())]).bool()
            samples.append(ChatSample(torch.cat([prompt, answer]), scored))
    return samples


def _until_end_of_turn(tokens: torch.Tensor, eos: int | None) -> torch.Tensor:
    ends = (tokens == eos).nonzero() if eos is not None else torch.empty(0)
    return tokens[: int(ends[0]) + 1] if len(ends) else tokens


def _batches(samples: list[ChatSample], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask, targets)`` of ``batch_size`` samples at a time, in order."""
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        width = max(sample.input_ids.numel() for sample in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, sample in enumerate(batch):
            length = sample.input_ids.numel()
            ids[row, :length], mask[row, :length], targets[row, :length] = sample.input_ids, 1, sample.targets
        yield ids, mask, targets
