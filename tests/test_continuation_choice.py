"""The held-out multiple-choice task: right answers really follow their context, wrong ones do not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from intactkv_modifier.eval.continuation_choice import TASK_NAME, continuation_questions, write_lm_eval_task


def _paragraphs(count: int, words: int = 30) -> str:
    return "\n".join(" ".join(f"p{i}w{j}" for j in range(words)) for i in range(count))


def test_right_answer_is_the_paragraphs_next_words_and_wrong_ones_come_from_others():
    questions = continuation_questions(_paragraphs(40), 25, context_words=5, answer_words=3)
    assert len(questions) == 25
    for question in questions:
        paragraph = question["context"].split()[0].split("w")[0]
        assert question["context"] == " ".join(f"{paragraph}w{j}" for j in range(5))
        assert question["choices"][question["label"]] == " ".join(f"{paragraph}w{j}" for j in range(5, 8))
        wrong = [c for i, c in enumerate(question["choices"]) if i != question["label"]]
        assert len(set(question["choices"])) == 4
        assert all(c.split()[0].startswith("p") and not c.startswith(f"{paragraph}w") for c in wrong)
    assert len({q["context"] for q in questions}) == 25  # each paragraph asked once
    assert len({q["label"] for q in questions}) > 1  # the right answer is not always in the same place


def test_questions_depend_only_on_the_seed():
    text = _paragraphs(40)
    assert continuation_questions(text, 10, seed=3) == continuation_questions(text, 10, seed=3)
    assert continuation_questions(text, 10, seed=3) != continuation_questions(text, 10, seed=4)


def test_short_paragraphs_are_skipped_and_too_few_is_an_error():
    text = _paragraphs(10, words=30) + "\n" + _paragraphs(50, words=10)
    assert len(continuation_questions(text, 10)) == 10
    with pytest.raises(ValueError, match="10 paragraphs of at least 22 words; 11 questions"):
        continuation_questions(text, 11)


def test_task_files_are_what_lm_eval_reads(tmp_path):
    questions = continuation_questions(_paragraphs(20), 8)
    assert write_lm_eval_task(tmp_path, questions) == TASK_NAME
    config = json.loads((tmp_path / f"{TASK_NAME}.yaml").read_text())
    assert config["task"] == TASK_NAME and config["output_type"] == "multiple_choice"
    data = config["dataset_kwargs"]["data_files"]["test"]
    assert [json.loads(line) for line in Path(data).read_text().splitlines()] == questions
