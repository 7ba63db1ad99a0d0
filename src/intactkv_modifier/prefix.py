"""Which tokens are the pivot prefix.

IntactKV only helps for tokens that start *every* prompt, so the prefix must be
exactly what the tokenizer puts first: its BOS token when it adds one, the system
part of a chat model's template (:mod:`intactkv_modifier.chat_template`), or a
fixed text tokenized the way prompts are.
"""

from __future__ import annotations

import torch
from loguru import logger
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from intactkv_modifier.chat_template import ChatTemplatePrefix

__all__ = ["measured_prefix", "prompt_start_tokens", "resolve_prefix_token_ids", "tokenizer_for"]


def tokenizer_for(model: torch.nn.Module, source: str | None) -> PreTrainedTokenizerBase | None:
    """The tokenizer at ``source``, else the one in the model's own folder (None when that has none).

    A tokenizer the user named must load; the model's folder may legitimately
    hold none, when the prefix is given as token ids.
    """
    location = source or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not location:
        return None
    try:
        return AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as error:
        if source is not None:
            raise ValueError(f"IntactKV could not load tokenizer {source!r}: {error}") from error
        logger.debug(f"IntactKV: no tokenizer at {location!r}: {error}")
        return None


def resolve_prefix_token_ids(
    *,
    prefix_token_ids: list[int] | None,
    prefix_text: str | None,
    tokenizer: PreTrainedTokenizerBase | None,
    max_positions: int | None,
    chat_template: ChatTemplatePrefix | None = None,
) -> list[int]:
    """Decide the prefix, raising an error that names the setting to fix when it cannot."""
    given = [name for name, value in (("prefix_token_ids", prefix_token_ids), ("prefix_text", prefix_text),
                                      ("prefix_chat_template", chat_template)) if value is not None]
    if len(given) > 1:
        raise ValueError(
            f"Set one of `prefix_token_ids`, `prefix_text` and `prefix_chat_template`, not both ({', '.join(given)})."
        )

    if prefix_token_ids is not None:
        ids = list(prefix_token_ids)
    elif prefix_text is not None or chat_template is not None:
        if tokenizer is None:
            raise ValueError(
                f"`{given[0]}` needs a tokenizer: pass `tokenizer=<path or hub id>` to IntactKVModifier, "
                "or give `prefix_token_ids` instead."
            )
        ids = (
            chat_template.token_ids(tokenizer) if chat_template is not None
            else list(tokenizer(prefix_text, add_special_tokens=True)["input_ids"])
        )
    else:
        ids = _bos_prefix(tokenizer)

    if not ids:
        raise ValueError("The IntactKV prefix is empty; it needs at least one token.")
    if max_positions is not None and len(ids) >= max_positions:
        raise ValueError(
            f"The IntactKV prefix has {len(ids)} tokens but the model's context is {max_positions} "
            "positions; the prefix must be shorter than the context."
        )
    return ids


def _bos_prefix(tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    if tokenizer is None:
        raise ValueError(
            "IntactKV defaults to the tokenizer's [BOS] token but no tokenizer was found; pass "
            "`tokenizer=<path>`, or set `prefix_token_ids` (e.g. [1]) or `prefix_text`."
        )
    start = prompt_start_tokens(tokenizer)
    if not start:
        raise ValueError(
            f"{type(tokenizer).__name__} does not start prompts with a BOS token, so IntactKV has no "
            "default prefix. For a chat model set `prefix_chat_template: true` (the template's system prompt; "
            "`{system_prompt: ...}` for your own); otherwise `prefix_text` (the fixed text every prompt starts "
            "with) or `prefix_token_ids`."
        )
    return start


def prompt_start_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[BOS]`` when the tokenizer starts every prompt with it, else no token."""
    bos = tokenizer.bos_token_id
    probe = tokenizer("Hello", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and probe and probe[0] == bos else []


def measured_prefix(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], str]:
    """The prefix a measurement starts its windows with when none is asked for, and how to name it.

    ``[BOS]`` when the tokenizer adds it; else the system turn of its chat template (a chat model
    without BOS, e.g. SmolLM2, whose every prompt starts with it); else nothing, the windows then
    starting with text. The modifier itself never guesses: it needs the prefix named.
    """
    start = prompt_start_tokens(tokenizer)
    if start:
        return start, "[BOS]"
    try:
        return ChatTemplatePrefix().token_ids(tokenizer), "the chat template's system turn"
    except ValueError:
        return [], "no prefix (no BOS, no chat template with a system turn)"
