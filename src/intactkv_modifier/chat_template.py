"""The intact prefix of a chat model: the system part its chat template renders before the first user turn.

A chat model's every prompt starts with the same system turn, so that whole turn is
the pivot prefix IntactKV keeps (the paper's main setting). Copying it by hand from a
template is error-prone (a doubled BOS, a missing newline, and it never matches), so
it is rendered here from the tokenizer's own template:

* with a given system prompt: the template's rendering of ``[system]`` alone, which
  must be where the rendering of ``[system, user]`` starts;
* with the template's default (the one it inserts when a conversation has none): the
  rendering of ``[user]`` minus what follows the system turn in ``[system, user]``.

Rendered text is tokenized as ``apply_chat_template`` tokenizes it (no special tokens
added: a template that wants a BOS writes it), and the prefix must end on a token
boundary of the whole prompt. Templates without a system turn fail with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

__all__ = ["ChatTemplatePrefix", "chat_system_part", "render_chat"]

_SYSTEM_PROBE = "INTACTKV SYSTEM PROMPT PROBE"
_USER_PROBE = "INTACTKV USER PROBE"


class ChatTemplatePrefix(BaseModel):
    """Take the prefix from the tokenizer's chat template: its system part before the first user turn.

    ``system_prompt``: the system prompt every conversation starts with; ``None`` takes the
    template's own default (SmolLM2: "You are a helpful AI assistant named SmolLM, ...").
    In YAML, ``prefix_chat_template: true`` (default system prompt) or
    ``prefix_chat_template: {system_prompt: "You are ..."}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    system_prompt: str | None = Field(default=None, min_length=1)

    def token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        return chat_system_part(tokenizer, self.system_prompt)[1]


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> str:
    """The template's text for ``messages``; a template error becomes a ``ValueError`` that names the template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template, so there is no system prompt to take as the prefix; "
            "set `prefix_text` or `prefix_token_ids` instead"
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja2's TemplateError and the template's own raise_exception(...)
        roles = [message["role"] for message in messages]
        raise ValueError(f"the chat template cannot render a conversation of roles {roles}: {error}") from error


def chat_system_part(tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None) -> tuple[str, list[int]]:
    """The text and token ids every conversation starts with before its first user message.

    Raises ``ValueError`` saying why when the template has no system part (it rejects or
    drops system messages, renders them apart from the conversation, or has no default).
    """
    with_probe = _system_turn(tokenizer, system_prompt or _SYSTEM_PROBE)
    text = with_probe.text if system_prompt is not None else _default_system_part(tokenizer, with_probe)
    ids = _tokens(tokenizer, text)
    whole = _tokens(tokenizer, text + with_probe.rest)
    if whole[: len(ids)] != ids:
        raise ValueError(
            f"the chat template's system part {text!r} does not end on a token boundary of the prompts that start "
            "with it, so no token prefix is shared by every prompt; set `prefix_token_ids` to the shared tokens"
        )
    return text, ids


@dataclass(frozen=True)
class _SystemTurn:
    """``text``: the template's rendering of the system turn; ``rest``: what ``[system, user]`` adds after it."""

    text: str
    rest: str


def _system_turn(tokenizer: PreTrainedTokenizerBase, system_prompt: str) -> _SystemTurn:
    system = {"role": "system", "content": system_prompt}
    alone = render_chat(tokenizer, [system])
    conversation = render_chat(tokenizer, [system, {"role": "user", "content": _USER_PROBE}])
    if system_prompt not in alone:
        raise ValueError("the chat template drops system messages, so it has no system part to take as the prefix")
    if not conversation.startswith(alone):
        raise ValueError(
            "the chat template renders a system message differently once a user turn follows it, so its system "
            f"part is not a prefix of every prompt ({alone!r} vs {conversation[: len(alone)]!r}); set "
            "`prefix_text` to the text every prompt starts with"
        )
    return _SystemTurn(text=alone, rest=conversation[len(alone) :])


def _default_system_part(tokenizer: PreTrainedTokenizerBase, probe: _SystemTurn) -> str:
    """What the template puts before the user turn of a conversation without a system message."""
    plain = render_chat(tokenizer, [{"role": "user", "content": _USER_PROBE}])
    if not plain.endswith(probe.rest) or len(plain) == len(probe.rest):
        raise ValueError(
            "the chat template adds no system prompt of its own to a conversation without one; give the system "
            "prompt your prompts start with: `prefix_chat_template: {system_prompt: ...}`"
        )
    return plain[: len(plain) - len(probe.rest)]


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    encoded: Any = tokenizer(text, add_special_tokens=False)
    return list(encoded["input_ids"])
