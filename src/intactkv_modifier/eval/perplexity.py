"""Perplexity on fixed token windows that each start with the pivot prefix.

Every row of a benchmark (FP, quantized, quantized+IntactKV) must see the same
tokens, so windows are cut once from a text and reused; each starts with the
prefix because that is how every real prompt starts, and how IntactKV applies.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from intactkv_modifier.architecture import text_config
from intactkv_modifier.devices import execution_device

__all__ = ["perplexity", "saved_windows", "target_logits", "token_windows"]


def token_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, prefix_token_ids: list[int], length: int, count: int
) -> torch.Tensor:
    """``count`` consecutive, non-overlapping windows of ``length`` tokens: the prefix, then text."""
    body = length - len(prefix_token_ids)
    if body <= 0:
        raise ValueError(f"window length {length} leaves no room after a {len(prefix_token_ids)}-token prefix")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    available = len(ids) // body
    if available < count:
        raise ValueError(f"the text has {len(ids)} tokens: {available} windows of {length}, not {count}")
    # explicit dtype: an empty prefix (a tokenizer without BOS, no prefix asked for) would be float otherwise
    prefix = torch.tensor(prefix_token_ids, dtype=torch.long).expand(count, -1)
    bodies = torch.tensor(ids[: count * body], dtype=torch.long).view(count, body)
    return torch.cat([prefix, bodies], dim=1)


def saved_windows(path: Path, split: Literal["calibration", "eval"], count: int) -> torch.Tensor:
    """The first ``count`` windows of ``split`` from a file of windows cut once (``torch.save`` of a dict of both
    splits): every machine then measures the same tokens, also one without the corpus."""
    windows = torch.load(path)[split]
    if windows.shape[0] < count:
        raise ValueError(f"{path} holds {windows.shape[0]} {split} windows, not {count}")
    return windows[:count]


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 8, desc: str = "perplexity",
    chunk_tokens: int = 1024, first_target: int = 1,
) -> float:
    """exp(mean next-token NLL) over the tokens at positions ``first_target`` onwards of every window.

    ``first_target=1`` counts every predicted token; a window that starts with a
    P-token system prompt counts only what follows it with ``first_target=P``,
    since a chat never asks the model to predict its own fixed system prompt.
    """
    if not 1 <= first_target < windows.shape[1]:
        raise ValueError(f"first_target {first_target} leaves no token to predict in windows of {windows.shape[1]}")
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, leave=False):
        batch = windows[start : start + batch_size]
        targets = torch.zeros_like(batch, dtype=torch.bool)
        targets[:, first_target:] = True
        for logits, labels in target_logits(model, batch, targets=targets, chunk_tokens=chunk_tokens):
            total_nll += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            total_tokens += labels.numel()
    return math.exp(total_nll / total_tokens)


def target_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    targets: torch.Tensor | None = None, chunk_tokens: int = 1024,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """float32 logits ``[n, vocab]`` of the positions that predict the target tokens, and those tokens ``[n]``,
    in chunks of at most ``chunk_tokens`` positions, row by row in order.

    ``targets`` ``[batch, length]`` marks the tokens to score (a token is predicted at the position before
    it); by default every token after the first of each row, padding (``attention_mask`` 0) excluded. The
    output head is applied a chunk at a time: a 262k-token vocabulary (Gemma 3) would otherwise need float32
    logits of ``batch x length x vocab`` (4 GiB for 8 x 512), so memory stays flat whatever the vocabulary.
    """
    head = model.get_output_embeddings()
    softcap = getattr(text_config(model.config), "final_logit_softcapping", None)
    device = execution_device(model.get_input_embeddings())
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    scored = mask.clone() if targets is None else targets.bool() & mask
    scored[:, 0] = False  # nothing predicts the first token
    # through the model's own forward (a compressed checkpoint decompresses there on first use), which
    # computes one position's logits; the final hidden states come back as the last hidden state
    output = model(
        input_ids=input_ids.to(device), attention_mask=None if attention_mask is None else attention_mask.to(device),
        use_cache=False, output_hidden_states=True, logits_to_keep=1,
    )
    predicting = scored[:, 1:].to(device)
    hidden = output.hidden_states[-1][:, :-1][predicting]
    labels = input_ids[:, 1:].to(device)[predicting]
    for chunk in range(0, labels.numel(), chunk_tokens):
        logits = head(hidden[chunk : chunk + chunk_tokens]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        yield logits, labels[chunk : chunk + chunk_tokens]
