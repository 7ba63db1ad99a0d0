"""Perplexity on fixed token windows that each start with the pivot prefix.

Every row of a benchmark (FP, quantized, quantized+IntactKV) must see the same
tokens, so windows are cut once from a text and reused; each starts with the
prefix because that is how every real prompt starts, and how IntactKV applies.
"""

from __future__ import annotations

import math

import torch
from compressed_tensors.offload import get_execution_device
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["perplexity", "token_windows"]


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
    prefix = torch.tensor(prefix_token_ids).expand(count, -1)
    bodies = torch.tensor(ids[: count * body]).view(count, body)
    return torch.cat([prefix, bodies], dim=1)


@torch.no_grad()
def perplexity(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 8, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over every predicted token of every window."""
    device = get_execution_device(model.get_input_embeddings())
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
