"""Conversations as the model sees them: token ids through the chat template, and which tokens are scored.

A chat model is used through its template, so the samples are rendered by the
tokenizer's own ``apply_chat_template`` (the system turn first: the template's default
system prompt, or a given one) and tokenized the way it tokenizes (no special tokens
added). The scored tokens are each assistant turn's answer and the token that ends
the turn (SmolLM2: ``<|im_end|>``); the system turn, the user turns, the
``<|im_start|>assistant\\n`` header and the newline after the end of turn are context
only. Every sample must start with the checkpoint's intact prefix, or the comparison
would measure prompts IntactKV never sees: :func:`require_prefix` refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from intactkv_modifier.chat_template import render_chat
from intactkv_modifier.eval.conversations import QuestionAnswer

__all__ = [
    "ChatSample", "chat_messages", "chat_windows", "generation_prompt", "render_sample", "require_prefix",
]


@dataclass(frozen=True)
class ChatSample:
    """``input_ids`` ``[tokens]``; ``targets`` ``[tokens]`` bool, True where the token is scored."""

    input_ids: torch.Tensor
    targets: torch.Tensor

    @property
    def scored(self) -> int:
        return int(self.targets.sum())


def chat_messages(pairs: list[QuestionAnswer], system_prompt: str | None = None) -> list[dict[str, str]]:
    """User/assistant turns of ``pairs`` in order, after a system message when ``system_prompt`` is given
    (without one, the template inserts its default)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    for pair in pairs:
        messages += [{"role": "user", "content": pair.question}, {"role": "assistant", "content": pair.answer}]
    return messages


def render_sample(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> ChatSample:
    """The whole conversation's tokens, every assistant turn's answer and end-of-turn token scored."""
    text = render_chat(tokenizer, messages)
    encoded: Any = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = torch.tensor([start for start, _ in encoded["offset_mapping"]])
    targets = torch.zeros(len(starts), dtype=torch.bool)
    for begin, end in _assistant_spans(tokenizer, messages, text):
        targets |= (starts >= begin) & (starts < end)
    return ChatSample(torch.tensor(encoded["input_ids"], dtype=torch.long), targets)


def generation_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> torch.Tensor:
    """The tokens a chat model is given to answer ``messages`` (ending in a user turn): the generation prompt."""
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def chat_windows(
    tokenizer: PreTrainedTokenizerBase, pairs: list[QuestionAnswer], system_prompt: str | None, length: int,
    count: int,
) -> torch.Tensor:
    """``count`` multi-turn conversations of exactly ``length`` tokens, ``[count, length]``: each the system turn,
    then consecutive question-answer pairs of ``pairs`` as turns until ``length`` is reached (the last turn cut).

    For calibration: fixed-length rows that start like every real prompt and read like real conversations.
    """
    rows, used = [], 0
    while len(rows) < count:
        turns: list[QuestionAnswer] = []
        ids = torch.empty(0, dtype=torch.long)
        while ids.numel() < length:
            if used == len(pairs):
                raise ValueError(
                    f"{len(pairs)} question-answer pairs make {len(rows)} conversations of {length} tokens, not {count}"
                )
            turns.append(pairs[used])
            used += 1
            text = render_chat(tokenizer, chat_messages(turns, system_prompt))
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        rows.append(ids[:length])
    return torch.stack(rows)


def require_prefix(input_ids: list[torch.Tensor] | torch.Tensor, prefix_token_ids: list[int], what: str) -> None:
    """Refuse samples that do not start with the intact prefix: IntactKV would not apply to them."""
    prefix = torch.tensor(prefix_token_ids, dtype=torch.long)
    for index, ids in enumerate(input_ids):
        if ids.numel() <= prefix.numel() or not torch.equal(ids[: prefix.numel()], prefix):
            raise ValueError(
                f"{what} {index} starts with {ids[: prefix.numel()].tolist()}, not with the intact prefix "
                f"{prefix_token_ids}: the conversations must start with the system prompt the checkpoint stores "
                "(give the same system prompt, or quantize with `prefix_chat_template`)"
            )


def _assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], text: str
) -> list[tuple[int, int]]:
    """Character spans of each assistant answer in ``text`` up to and including the end-of-turn token's text.

    Each turn is located by rendering the conversation up to it with the generation prompt and through
    it; a template that renders earlier turns differently once later ones follow is refused.
    """
    spans = []
    end_of_turn = tokenizer.eos_token or ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: index + 1])
        if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
            raise ValueError(
                "the chat template renders earlier turns differently once later turns follow, so the assistant "
                "turns cannot be located in the conversation"
            )
        turn = through[len(before) :]
        cut = turn.find(end_of_turn) if end_of_turn else -1
        spans.append((len(before), len(before) + (cut + len(end_of_turn) if cut >= 0 else len(turn))))
    return spans
