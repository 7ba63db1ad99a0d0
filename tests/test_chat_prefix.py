"""The prefix of a chat model, taken from its chat template, on a tiny tokenizer without BOS.

The tiny template is ChatML-like and inserts a default system turn when a conversation has none, as
SmolLM2's does (see ``tiny_models.CHAT_TEMPLATE``).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import CHAT_SYSTEM_TURN, CHAT_TEMPLATE, IM_END, IM_START, build_tokenizer, load, load_tokenizer
from tolerances import relative_error, two_forwards, within

from intactkv_modifier import IntactKVModifier, capture_prefix_kv
from intactkv_modifier.chat_template import ChatTemplatePrefix, chat_system_part
from intactkv_modifier.eval.perplexity import token_windows
from intactkv_modifier.prefix import measured_prefix, resolve_prefix_token_ids

SYSTEM_TURN_IDS = [IM_START, 104, 114, 115, 116, IM_END]  # "<|im_start|> w100 w110 w111 w112 <|im_end|>"


@pytest.fixture
def chat_tokenizer():
    return build_tokenizer(adds_bos=False, chat_template=CHAT_TEMPLATE)


def with_template(template: str):
    return build_tokenizer(adds_bos=False, chat_template=template)


def test_the_default_system_turn_is_what_the_template_puts_before_the_first_user_turn(chat_tokenizer):
    text, ids = chat_system_part(chat_tokenizer)
    assert text == CHAT_SYSTEM_TURN and ids == SYSTEM_TURN_IDS
    rendered = chat_tokenizer.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False)
    assert chat_tokenizer(rendered, add_special_tokens=False)["input_ids"][: len(ids)] == ids


def test_a_given_system_prompt_is_rendered_by_the_template(chat_tokenizer):
    assert chat_system_part(chat_tokenizer, "w1 w2")[1] == [IM_START, 104, 5, 6, IM_END]


def test_a_template_that_rejects_system_messages_fails_with_the_reason():
    rejecting = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] + ' ' }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="cannot render a conversation of roles \\['system'\\].*not supported"):
        chat_system_part(with_template(rejecting))


def test_a_template_that_drops_system_messages_has_no_system_part():
    dropping = "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] + ' ' }}{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="drops system messages"):
        chat_system_part(with_template(dropping))


def test_a_template_without_a_default_system_prompt_asks_for_one():
    plain = "{% for m in messages %}{{ '<|im_start|> ' + m['content'] + ' <|im_end|> ' }}{% endfor %}"
    with pytest.raises(ValueError, match="adds no system prompt of its own"):
        chat_system_part(with_template(plain))
    assert chat_system_part(with_template(plain), "w3")[1] == [IM_START, 7, IM_END]


def test_a_tokenizer_without_a_chat_template_is_named():
    with pytest.raises(ValueError, match="has no chat template"):
        chat_system_part(build_tokenizer(adds_bos=False))


def test_resolve_takes_the_chat_template_and_refuses_two_settings(chat_tokenizer):
    resolve = dict(prefix_token_ids=None, prefix_text=None, tokenizer=chat_tokenizer, max_positions=64)
    assert resolve_prefix_token_ids(**resolve, chat_template=ChatTemplatePrefix()) == SYSTEM_TURN_IDS
    with pytest.raises(ValueError, match="not both \\(prefix_text, prefix_chat_template\\)"):
        resolve_prefix_token_ids(**{**resolve, "prefix_text": "w1"}, chat_template=ChatTemplatePrefix())
    with pytest.raises(ValueError, match="prefix_chat_template: true"):
        resolve_prefix_token_ids(**resolve)  # no BOS, nothing named: the error says what to set


@pytest.mark.parametrize(
    ("value", "system_prompt"), [(True, None), ("w1 w2", "w1 w2"), ({"system_prompt": "w3"}, "w3")],
    ids=["true", "string", "object"],
)
def test_the_modifier_takes_the_yaml_shorthands(value, system_prompt):
    assert IntactKVModifier(prefix_chat_template=value).prefix_chat_template == ChatTemplatePrefix(
        system_prompt=system_prompt
    )
    assert IntactKVModifier(prefix_chat_template=False).prefix_chat_template is None


def test_the_modifier_refuses_two_prefix_settings():
    with pytest.raises(ValueError, match="not both"):
        IntactKVModifier(prefix_chat_template=True, prefix_token_ids=[1])


def test_measurements_without_bos_start_with_the_system_turn(chat_tokenizer):
    assert measured_prefix(chat_tokenizer) == (SYSTEM_TURN_IDS, "the chat template's system turn")
    assert measured_prefix(build_tokenizer(adds_bos=False))[0] == []
    assert measured_prefix(build_tokenizer(adds_bos=True))[0] == [1]


def test_windows_without_a_prefix_are_token_ids(chat_tokenizer):
    windows = token_windows(chat_tokenizer, " ".join(f"w{i % 100}" for i in range(200)), [], 16, 4)
    assert windows.dtype == torch.long and windows.shape == (4, 16)


def test_oneshot_on_a_model_without_bos_stores_the_system_turn(tiny_chat_model_dir):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from intactkv_modifier import intact_kv_disabled

    tokenizer = load_tokenizer(tiny_chat_model_dir)
    model = load(tiny_chat_model_dir)
    rows = [SYSTEM_TURN_IDS + [10 + (i * 7 + j) % 90 for j in range(20)] for i in range(4)]
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    modifier = IntactKVModifier(prefix_chat_template=True)
    oneshot(model=model, processor=tokenizer, dataset=dataset, num_calibration_samples=4,
            recipe=[GPTQModifier(scheme="W4A16", targets="Linear", ignore=["lm_head"]), modifier])
    assert modifier.resolved_prefix_token_ids == SYSTEM_TURN_IDS
    ids = torch.tensor([rows[0]])
    with torch.no_grad():
        on = model(input_ids=ids).logits
        with intact_kv_disabled(model):
            off = model(input_ids=ids).logits
    assert not torch.allclose(on[0, len(SYSTEM_TURN_IDS):], off[0, len(SYSTEM_TURN_IDS):])


def test_the_first_token_cut_from_the_system_turn_is_that_token_captured_alone(tiny_chat_model_dir):
    """The chat benchmark's one-token column cuts the captured system turn to its first position: with causal
    attention that is the KV ``<|im_start|>`` has when captured alone, up to the order of sums."""
    model = load(tiny_chat_model_dir)
    whole = capture_prefix_kv(model, SYSTEM_TURN_IDS)
    cut, alone = whole.truncated(1), capture_prefix_kv(model, SYSTEM_TURN_IDS[:1])
    bound = two_forwards(model.config, len(SYSTEM_TURN_IDS))
    for got, want in zip(cut.keys + cut.values, alone.keys + alone.values):
        assert got.shape[1] == 1 and within(relative_error(got, want), bound)
    assert not torch.equal(whole.keys[0][:, 1], whole.keys[0][:, 0])  # a second position that the cut drops
    for length in (0, len(SYSTEM_TURN_IDS) + 1):
        with pytest.raises(ValueError, match=f"cannot keep {length} of a {len(SYSTEM_TURN_IDS)}-token prefix"):
            whole.truncated(length)
