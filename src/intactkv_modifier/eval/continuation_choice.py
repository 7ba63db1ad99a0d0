"""A multiple-choice task built from held-out text, for lm-eval's harness offline.

No machine here can download an lm-eval task's data, so the quality benchmark
asks the model questions made from the corpus's ``eval`` split instead: a
paragraph's first words are the context, its next words the right answer, and
the same span of other paragraphs the wrong ones. lm-eval scores each choice
by its log-likelihood after the context (``acc``; ``acc_norm`` per byte), as
it does for HellaSwag-style tasks. Every prompt starts with ``[BOS]``, so
IntactKV applies to every request.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TypedDict

__all__ = ["TASK_NAME", "ContinuationQuestion", "continuation_questions", "write_lm_eval_task"]

TASK_NAME = "intactkv_continuation_choice"


class ContinuationQuestion(TypedDict):
    context: str
    choices: list[str]
    label: int


def continuation_questions(
    text: str,
    count: int,
    *,
    context_words: int = 16,
    answer_words: int = 6,
    num_choices: int = 4,
    seed: int = 0,
) -> list[ContinuationQuestion]:
    """``count`` questions from the paragraphs (lines) of ``text`` long enough to hold context and answer.

    Wrong answers are the same word span of other paragraphs, never equal to
    the right one; the right answer's position is drawn from ``seed``.
    """
    span = context_words + answer_words
    paragraphs = [words for line in text.splitlines() if len(words := line.split()) >= span]
    if len(paragraphs) < max(count, num_choices):
        raise ValueError(
            f"the text has {len(paragraphs)} paragraphs of at least {span} words; {count} questions with "
            f"{num_choices} choices need at least {max(count, num_choices)}"
        )
    rng = random.Random(seed)
    order = rng.sample(range(len(paragraphs)), len(paragraphs))
    answers = [" ".join(words[context_words:span]) for words in paragraphs]
    questions: list[ContinuationQuestion] = []
    for index in order[:count]:
        wrong: list[str] = []
        while len(wrong) < num_choices - 1:
            candidate = answers[rng.randrange(len(paragraphs))]
            if candidate != answers[index] and candidate not in wrong:
                wrong.append(candidate)
        label = rng.randrange(num_choices)
        choices = [*wrong[:label], answers[index], *wrong[label:]]
        questions.append({"context": " ".join(paragraphs[index][:context_words]), "choices": choices, "label": label})
    return questions


def write_lm_eval_task(directory: Path, questions: list[ContinuationQuestion]) -> str:
    """Write the questions and an lm-eval task config into ``directory``; returns the task name.

    Pass ``TaskManager(include_path=str(directory))`` to ``lm_eval.simple_evaluate``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "questions.jsonl"
    data.write_text("".join(json.dumps(question) + "\n" for question in questions))
    # lm-eval reads YAML; JSON is YAML, and json.dumps quotes the path and the Jinja templates safely
    config = {
        "task": TASK_NAME,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    (directory / f"{TASK_NAME}.yaml").write_text(json.dumps(config, indent=2) + "\n")
    return TASK_NAME
