"""The chat evaluation: three held-out sets built once, then scored the same way for every model.

* ``single_turn``: one question and its corpus answer after the system turn; perplexity
  of the answer and its end-of-turn token;
* ``multi_turn``: several question-answer turns after the system turn (the prefix stays
  the first turn); perplexity of every assistant turn;
* ``greedy``: held-out questions answered greedily by the FP model; each model's KL to
  the FP model and top-1 agreement along those answers.

All three come from the corpus's held-out split (:mod:`.conversations`), drawn once
by ``seed`` without repeating a pair, and every sample must start with the intact
prefix. Build the set once and score every row on it: the rows then compare the
same tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from intactkv_modifier.eval.chat_samples import (
    ChatSample,
    chat_messages,
    generation_prompt,
    render_sample,
    require_prefix,
)
from intactkv_modifier.eval.chat_scores import agreement, assistant_perplexity, greedy_answers
from intactkv_modifier.eval.conversations import sample_question_answers

_PARTS = ("single_turn", "multi_turn", "greedy")

__all__ = ["ChatEvalSet", "ChatEvalSizes", "ChatScores", "build_chat_eval_set", "score_chat"]


class ChatEvalSizes(BaseModel):
    """How many held-out samples each part uses; the defaults fit a 2-core CPU with a 135M model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    single_turn: int = Field(default=64, ge=1)
    multi_turn: int = Field(default=16, ge=0)
    turns: int = Field(default=3, ge=2)
    greedy: int = Field(default=32, ge=0)
    max_new_tokens: int = Field(default=48, ge=1)
    max_answer_chars: int = Field(default=600, ge=60)


@dataclass(frozen=True)
class ChatEvalSet:
    single_turn: list[ChatSample]
    multi_turn: list[ChatSample]
    greedy: list[ChatSample]

    def to_tensors(self) -> dict[str, list[list[torch.Tensor]]]:
        """Plain tensors (``torch.save``-able, loadable with ``weights_only=True``): the same samples elsewhere,
        e.g. on a machine without the corpus, or one whose FP model would answer a near-tie otherwise."""
        return {part: [[s.input_ids, s.targets] for s in getattr(self, part)] for part in _PARTS}

    @classmethod
    def from_tensors(cls, saved: dict[str, list[list[torch.Tensor]]]) -> ChatEvalSet:
        return cls(*([ChatSample(ids, targets.bool()) for ids, targets in saved[part]] for part in _PARTS))

    def describe(self) -> dict[str, int]:
        """Samples and scored tokens of each part: what a table reports beside its figures."""
        return {
            f"{part}_{what}": value
            for part, samples in (("single_turn", self.single_turn), ("multi_turn", self.multi_turn),
                                  ("greedy", self.greedy))
            for what, value in (("samples", len(samples)), ("scored_tokens", sum(s.scored for s in samples)))
        }


@dataclass(frozen=True)
class ChatScores:
    """Assistant-turn perplexities, and KL / top-1 agreement to the FP model (None without a reference)."""

    single_turn_ppl: float
    multi_turn_ppl: float | None
    kl_to_fp: float | None
    top1_agreement: float | None

    def to_json(self) -> dict[str, float | None]:
        return asdict(self)


def build_chat_eval_set(
    tokenizer: PreTrainedTokenizerBase, prefix_token_ids: list[int], reference: PreTrainedModel | None,
    system_prompt: str | None = None, sizes: ChatEvalSizes | None = None, seed: int = 0, batch_size: int = 8,
) -> ChatEvalSet:
    """The held-out samples, each checked to start with ``prefix_token_ids``; ``reference`` (the FP model)
    answers the greedy part, which is left empty without it."""
    sizes = sizes or ChatEvalSizes()
    greedy_count = sizes.greedy if reference is not None else 0
    pairs = sample_question_answers(
        "eval", sizes.single_turn + sizes.multi_turn * sizes.turns + greedy_count, seed, sizes.max_answer_chars
    )
    single, rest = pairs[: sizes.single_turn], pairs[sizes.single_turn :]
    multi, questions = rest[: sizes.multi_turn * sizes.turns], rest[sizes.multi_turn * sizes.turns :]
    single_turn = [render_sample(tokenizer, chat_messages([pair], system_prompt)) for pair in single]
    multi_turn = [
        render_sample(tokenizer, chat_messages(multi[start : start + sizes.turns], system_prompt))
        for start in range(0, len(multi), sizes.turns)
    ]
    prompts = [generation_prompt(tokenizer, chat_messages([pair], system_prompt)[:-1]) for pair in questions]
    for what, samples in (("conversation", single_turn), ("multi-turn conversation", multi_turn)):
        require_prefix([sample.input_ids for sample in samples], prefix_token_ids, what)
    require_prefix(prompts, prefix_token_ids, "question prompt")
    greedy = greedy_answers(reference, tokenizer, prompts, sizes.max_new_tokens, batch_size) if prompts else []
    return ChatEvalSet(single_turn, multi_turn, greedy)


def score_chat(
    model: PreTrainedModel, eval_set: ChatEvalSet, reference: PreTrainedModel | None = None, batch_size: int = 8
) -> ChatScores:
    """``model``'s scores on ``eval_set``; the agreement part needs the FP ``reference`` and a greedy part."""
    compare = reference is not None and eval_set.greedy
    measured = agreement(model, reference, eval_set.greedy, batch_size) if compare else None
    return ChatScores(
        single_turn_ppl=assistant_perplexity(model, eval_set.single_turn, batch_size),
        multi_turn_ppl=assistant_perplexity(model, eval_set.multi_turn, batch_size) if eval_set.multi_turn else None,
        kl_to_fp=measured.kl if measured else None,
        top1_agreement=measured.top1 if measured else None,
    )
