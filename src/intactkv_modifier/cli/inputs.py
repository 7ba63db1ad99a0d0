"""What the commands read: the model named on the command line, text, and the token windows cut from it.

Every window a command builds starts with the prefix the checkpoint stores (or, for
``quantize``, the prefix the recipe's ``IntactKVModifier`` will store), because that is
how real prompts start and the only case IntactKV changes. ``--data chat`` builds the
windows as conversations through the model's chat template instead of plain text.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from intactkv_modifier.eval.corpus import Split

__all__ = ["DataKind", "model_source", "text_of", "text_windows", "windows"]

class DataKind(str, Enum):
    """What windows are made of: plain text after the prefix, or conversations through the chat template."""

    text = "text"
    chat = "chat"


def model_source(value: str) -> str:
    """``value`` when it is a local folder or can be a hub id; a path that does not exist fails here, with its name,
    instead of inside the hub client with its repository-id rules."""
    from intactkv_modifier.checkpoint.source import is_hub_id

    path = Path(value).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"{value} is a file, not a model folder: give the folder that holds config.json")
    if not is_hub_id(value):
        raise FileNotFoundError(f"no such folder: {value}")
    return value


def text_of(path: Path | None, split: Split = "eval") -> tuple[str, str]:
    """The text to cut windows from and how to name it in the output."""
    if path is not None:
        return path.read_text(), str(path)
    from intactkv_modifier.eval.corpus import load_corpus_text

    return load_corpus_text(split), f"built-in corpus, {split} split"


def text_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, prefix: list[int], length: int, count: int
) -> torch.Tensor:
    from intactkv_modifier.eval.perplexity import token_windows

    try:
        return token_windows(tokenizer, text, prefix, length, count)
    except ValueError as error:
        raise ValueError(f"{error}: give a longer text, fewer windows or a shorter --seq-len") from error


def windows(
    tokenizer: PreTrainedTokenizerBase, data: DataKind, text_file: Path | None, split: Split, prefix: list[int],
    system_prompt: str | None, length: int, count: int, seed: int,
) -> tuple[torch.Tensor, str]:
    """``count`` windows of ``length`` tokens starting with ``prefix`` from ``split``, and how to name their source.

    ``text``: the prefix, then plain text (``text_file``, or the built-in corpus). ``chat``: multi-turn
    conversations of the corpus's question-answer pairs rendered by the chat template (with ``system_prompt``,
    or the template's default system turn), drawn by ``seed``; each must start with ``prefix``.
    """
    if data == DataKind.text:
        text, source = text_of(text_file, split=split)
        return text_windows(tokenizer, text, prefix, length, count), source
    if text_file is not None:
        raise ValueError("a text file is plain text; --data chat builds its conversations from the built-in corpus")
    from intactkv_modifier.eval.chat_samples import chat_windows, require_prefix
    from intactkv_modifier.eval.conversations import question_answers, sample_question_answers

    available = len(question_answers(split))
    pairs = sample_question_answers(split, min(8 * count, available), seed)
    rows = chat_windows(tokenizer, pairs, system_prompt, length, count)
    require_prefix(rows, prefix, f"{split} conversation")
    return rows, f"built-in corpus, {split} split, as multi-turn conversations"
