"""Questions and answers made from the project's real-English corpus, for chat-shaped calibration and evaluation.

No chat data set installs offline, but the corpus (:mod:`.corpus`) holds two kinds of
text that read naturally as an assistant's answer to a question a user would ask:

* a GCIDE dictionary entry answers "What does the word 'X' mean?";
* a Python documentation paragraph right under a ``.. function::`` directive answers
  "What does the Python function `mod.f(args)` do?".

The answers are the corpus's own words (an entry as the corpus cleans it, a paragraph
with the same reStructuredText roles removed), cut at a sentence end after at most
``max_answer_chars``. Every pair keeps the split of the document it comes from (a
dictionary headword, a documentation page), so held-out conversations never share a
document with calibration conversations.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from intactkv_modifier.eval.corpus import PYTHON_DOCS, Split, clean_rst_roles, corpus_documents, split_of

__all__ = ["QuestionAnswer", "question_answers", "sample_question_answers"]

#: Entries that only point elsewhere ("See Alchemic.") make no answer.
_MIN_ANSWER_CHARS = 60
_FUNCTION = re.compile(r"^\.\. function:: (\S.*)$")
_MODULE = re.compile(r"^\.\. (?:current)?module:: (\S+)")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


@dataclass(frozen=True)
class QuestionAnswer:
    """One user question and the answer the corpus gives; ``source`` names the document (and fixes the split)."""

    question: str
    answer: str
    source: str


def question_answers(split: Split, max_answer_chars: int = 600) -> list[QuestionAnswer]:
    """Every pair of one split, dictionary entries first, in corpus order."""
    return [*_dictionary_pairs(split, max_answer_chars), *_function_pairs(split, max_answer_chars)]


def sample_question_answers(
    split: Split, count: int, seed: int, max_answer_chars: int = 600, python_share: float = 0.25
) -> list[QuestionAnswer]:
    """``count`` pairs drawn without replacement by ``seed``: about ``python_share`` of them about Python
    functions (as many as the split holds), the rest dictionary words, in a shuffled order."""
    pairs = question_answers(split, max_answer_chars)
    python = [pair for pair in pairs if pair.source.startswith("pydoc:")]
    words = [pair for pair in pairs if not pair.source.startswith("pydoc:")]
    rng = random.Random(seed)
    take_python = min(len(python), round(count * python_share))
    if count - take_python > len(words):
        raise ValueError(f"the {split} split holds {len(pairs)} question-answer pairs, not {count}")
    chosen = rng.sample(python, take_python) + rng.sample(words, count - take_python)
    rng.shuffle(chosen)
    return chosen


def _dictionary_pairs(split: Split, max_answer_chars: int) -> list[QuestionAnswer]:
    pairs = []
    for name, text in corpus_documents(split):
        if not name.startswith("gcide:"):
            continue
        answer = _first_sentences(text, max_answer_chars)
        if len(answer) >= _MIN_ANSWER_CHARS:
            headword = name.removeprefix("gcide:")
            pairs.append(QuestionAnswer(f"What does the word '{headword}' mean?", answer, name))
    return pairs


def _function_pairs(split: Split, max_answer_chars: int) -> list[QuestionAnswer]:
    pairs = []
    for page, functions in _documented_functions().items():
        if split_of(page) != split:
            continue
        for signature, paragraph in functions:
            answer = _first_sentences(paragraph, max_answer_chars)
            if len(answer) >= _MIN_ANSWER_CHARS:
                pairs.append(QuestionAnswer(f"What does the Python function `{signature}` do?", answer, page))
    return pairs


@lru_cache(maxsize=1)
def _documented_functions() -> dict[str, list[tuple[str, str]]]:
    """Page name -> (signature with its module, first paragraph) of each ``.. function::`` on the page."""
    return {
        f"pydoc:{path.relative_to(PYTHON_DOCS)}": _page_functions(path)
        for path in sorted(PYTHON_DOCS.rglob("*.rst.txt"))
    }


def _page_functions(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(errors="replace").splitlines()
    module, found = "", []
    for index, line in enumerate(lines):
        if match := _MODULE.match(line):
            module = match.group(1)
        elif match := _FUNCTION.match(line):
            signature = match.group(1).strip()
            paragraph = _first_indented_paragraph(lines, index + 1)
            if paragraph:
                found.append((f"{module}.{signature}" if module else signature, paragraph))
    return found


def _first_indented_paragraph(lines: list[str], start: int) -> str:
    """The directive's first body paragraph: indented lines after its options and blank lines, up to a blank."""
    index = start
    while index < len(lines) and (not lines[index].strip() or lines[index].strip().startswith(":")):
        if lines[index].strip() and not lines[index].startswith(" "):
            return ""  # another directive or text at the margin: no body
        index += 1
    paragraph = []
    while index < len(lines) and lines[index].startswith(" ") and lines[index].strip():
        if lines[index].strip().startswith(".. "):
            break
        paragraph.append(lines[index].strip())
        index += 1
    return clean_rst_roles(" ".join(paragraph))  # joined first: a role may span two lines


def _first_sentences(text: str, max_chars: int) -> str:
    """``text`` with its whitespace joined, cut after the last sentence end within ``max_chars``
    (or at ``max_chars`` when no sentence ends before it)."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    ends = [match.end() for match in _SENTENCE_END.finditer(text) if match.end() <= max_chars]
    return text[: ends[-1]] if ends else text[:max_chars]
