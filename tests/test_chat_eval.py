"""Chat-shaped samples and their scores on the tiny chat model: which tokens count, and that the numbers are
the ones a direct computation gives, whatever the batching."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import CHAT_TEMPLATE, IM_END, build_tokenizer, load

from intactkv_modifier.eval.chat_samples import (
    ChatSample,
    chat_messages,
    chat_windows,
    generation_prompt,
    render_sample,
    require_prefix,
)
from intactkv_modifier.eval.chat_scores import agreement, assistant_perplexity, greedy_answers
from intactkv_modifier.eval.conversations import QuestionAnswer

PAIRS = [QuestionAnswer(f"w{i} w{i + 1}", " ".join(f"w{i + k}" for k in range(2, 6 + i % 3)), f"src{i}")
         for i in range(20)]


@pytest.fixture
def tokenizer():
    return build_tokenizer(adds_bos=False, chat_template=CHAT_TEMPLATE)


def test_only_the_answers_and_their_end_of_turn_tokens_are_scored(tokenizer):
    sample = render_sample(tokenizer, chat_messages(PAIRS[:2]))
    scored = sample.input_ids[sample.targets].tolist()
    answers = [tokenizer(p.answer, add_special_tokens=False)["input_ids"] + [IM_END] for p in PAIRS[:2]]
    assert scored == answers[0] + answers[1]
    assert tokenizer.decode(sample.input_ids).startswith("<|im_start|> w100 w110")  # the default system turn first


def test_the_generation_prompt_is_where_the_conversation_continues(tokenizer):
    messages = chat_messages(PAIRS[:1], system_prompt="w1")
    prompt = generation_prompt(tokenizer, messages[:-1])
    whole = render_sample(tokenizer, messages)
    assert torch.equal(whole.input_ids[: prompt.numel()], prompt)
    assert not whole.targets[: prompt.numel()].any() and whole.targets[prompt.numel()]


def test_conversations_that_miss_the_prefix_are_refused(tokenizer):
    sample = render_sample(tokenizer, chat_messages(PAIRS[:1], system_prompt="w1"))
    with pytest.raises(ValueError, match="not with the intact prefix"):
        require_prefix([sample.input_ids], [124, 104, 114], "conversation")
    require_prefix([sample.input_ids], sample.input_ids[:3].tolist(), "conversation")


def test_calibration_windows_are_whole_turns_cut_to_length(tokenizer):
    windows = chat_windows(tokenizer, PAIRS, None, length=40, count=3)
    assert windows.shape == (3, 40) and windows.dtype == torch.long
    first = render_sample(tokenizer, chat_messages(PAIRS[:4])).input_ids
    assert torch.equal(windows[0], first[:40])
    with pytest.raises(ValueError, match="not 50"):
        chat_windows(tokenizer, PAIRS, None, length=40, count=50)


def test_assistant_perplexity_counts_the_scored_tokens_whatever_the_batching(tiny_chat_model_dir, tokenizer):
    model = load(tiny_chat_model_dir)
    samples = [render_sample(tokenizer, chat_messages(PAIRS[i : i + 1 + i % 2])) for i in range(5)]
    nll, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            logits = model(input_ids=sample.input_ids[None]).logits[0, :-1]
            losses = torch.nn.functional.cross_entropy(logits, sample.input_ids[1:], reduction="none")
            nll += float(losses[sample.targets[1:]].sum())
            count += sample.scored
    expected = math.exp(nll / count)
    assert assistant_perplexity(model, samples, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert assistant_perplexity(model, samples, batch_size=3) == pytest.approx(expected, rel=1e-4)  # right padding


def test_a_model_agrees_with_itself_and_not_with_another(tiny_chat_model_dir, tokenizer):
    model = load(tiny_chat_model_dir)
    prompts = [generation_prompt(tokenizer, chat_messages(PAIRS[i : i + 1])[:-1]) for i in range(4)]
    samples = greedy_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert all(s.scored >= 1 and torch.equal(s.input_ids[: p.numel()], p) for s, p in zip(samples, prompts))
    same = agreement(model, model, samples, batch_size=2)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1 == 1.0
    assert same.positions == sum(s.scored for s in samples)
    other = load(tiny_chat_model_dir)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    differs = agreement(other, model, samples, batch_size=2)
    assert differs.kl > 1e-3


def test_greedy_answers_keep_the_end_of_turn_token_and_stop_there(tiny_chat_model_dir, tokenizer):
    model = load(tiny_chat_model_dir)
    prompt = generation_prompt(tokenizer, chat_messages(PAIRS[:1])[:-1])
    (sample,) = greedy_answers(model, tokenizer, [prompt], max_new_tokens=8)
    answer = sample.input_ids[sample.targets]
    assert IM_END not in answer[:-1].tolist()
    assert answer.numel() <= 8
    assert isinstance(sample, ChatSample)


def test_an_eval_set_travels_as_plain_tensors(tokenizer, tmp_path):
    from intactkv_modifier.eval.chat_eval import ChatEvalSet

    samples = [render_sample(tokenizer, chat_messages(PAIRS[i : i + 1])) for i in range(3)]
    original = ChatEvalSet(single_turn=samples[:2], multi_turn=[], greedy=samples[2:])
    torch.save(original.to_tensors(), tmp_path / "samples.pt")
    loaded = ChatEvalSet.from_tensors(torch.load(tmp_path / "samples.pt", weights_only=True))
    assert loaded.describe() == original.describe()
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
               for a, b in zip(loaded.single_turn + loaded.greedy, original.single_turn + original.greedy))
