"""The stored prefix KV is used exactly where it applies, and nowhere else."""

from __future__ import annotations

import concurrent.futures
import contextlib

import pytest
import torch
from loguru import logger
from tiny_models import ARCHITECTURES, BOS, left_pad, load, load_tokenizer, text_samples
from tolerances import beyond, relative_error, two_forwards, within

from intactkv_modifier import PrefixKV, attach_intact_kv, capture_prefix_kv, intact_kv_disabled

pytestmark = pytest.mark.numerics  # CI runs these under other CPU kernels and thread counts too


def _prefix_of(tokenizer) -> list[int]:
    """Llama/Qwen3 tokenizers add BOS; Qwen2's does not, so its prefix is a fixed text."""
    if tokenizer.bos_token_id is not None:
        return [BOS]
    return tokenizer("w7 w8 w9")["input_ids"]


def _prompts(tokenizer, prefix: list[int], lengths: tuple[int, ...]) -> list[list[int]]:
    """Token id rows with bodies of the given lengths, each starting with the prefix."""
    texts = text_samples(len(lengths), max(lengths))
    return [
        prefix + tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        for text, length in zip(texts, lengths)
    ]


def _scaled(kv: PrefixKV, factor: float) -> PrefixKV:
    return PrefixKV(keys=[k * factor for k in kv.keys], values=[v * factor for v in kv.values])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_own_full_precision_kv_leaves_logits_unchanged(tiny_model_dirs, architecture):
    model = load(tiny_model_dirs[architecture])
    tokenizer = load_tokenizer(tiny_model_dirs[architecture])
    prefix = _prefix_of(tokenizer)
    ids = torch.tensor(_prompts(tokenizer, prefix, (12, 12, 12)))
    plain = model(input_ids=ids).logits

    attach_intact_kv(model, prefix, capture_prefix_kv(model, prefix))
    with_intact = model(input_ids=ids).logits

    # the prefix K/V were computed in a forward of the prefix alone (another matmul shape), the rest is the same
    assert within(relative_error(with_intact, plain), two_forwards(model.config, ids.shape[1]))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_stored_kv_replaces_the_prefix_kv(tiny_model_dirs, architecture):
    model = load(tiny_model_dirs[architecture])
    tokenizer = load_tokenizer(tiny_model_dirs[architecture])
    prefix = _prefix_of(tokenizer)
    ids = torch.tensor(_prompts(tokenizer, prefix, (10,)))
    plain = model(input_ids=ids).logits

    attach_intact_kv(model, prefix, _scaled(capture_prefix_kv(model, prefix), 3.0))
    changed = model(input_ids=ids).logits
    with intact_kv_disabled(model):
        disabled = model(input_ids=ids).logits

    assert beyond(relative_error(changed, plain), 10 * two_forwards(model.config, ids.shape[1]))  # 10x rounding's
    torch.testing.assert_close(disabled, plain, atol=0, rtol=0)


def test_generate_with_cache_equals_full_recompute(tiny_model_dirs):
    """Greedy decoding reuses the spliced prefix KV from the cache at every step."""
    model = load(tiny_model_dirs["llama"])
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    attach_intact_kv(model, [BOS], _scaled(capture_prefix_kv(model, [BOS]), 2.0))
    ids = torch.tensor(_prompts(tokenizer, [BOS], (6,)))

    generated = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    recomputed = ids
    for _ in range(8):
        next_token = model(input_ids=recomputed, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        recomputed = torch.cat([recomputed, next_token], dim=1)

    assert torch.equal(generated, recomputed)


def test_sampling_is_reproducible_and_uses_the_prefix(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    ids = torch.tensor(_prompts(tokenizer, [BOS], (6,)))
    kwargs = dict(input_ids=ids, max_new_tokens=12, do_sample=True, top_k=0, pad_token_id=0)
    torch.manual_seed(3)
    plain = model.generate(**kwargs)

    kv = capture_prefix_kv(model, [BOS])
    attach_intact_kv(model, [BOS], PrefixKV(keys=kv.keys, values=[v + 2.0 * torch.randn_like(v) for v in kv.values]))
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(model.generate(**kwargs))
    torch.manual_seed(3)
    with intact_kv_disabled(model):
        disabled = model.generate(**kwargs)

    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], plain)
    assert torch.equal(disabled, plain)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_left_padded_batch_equals_unbatched(tiny_model_dirs, architecture):
    model = load(tiny_model_dirs[architecture])
    tokenizer = load_tokenizer(tiny_model_dirs[architecture])
    prefix = _prefix_of(tokenizer)
    attach_intact_kv(model, prefix, _scaled(capture_prefix_kv(model, prefix), 2.0))
    rows = _prompts(tokenizer, prefix, (4, 9, 6))
    ids, mask = left_pad(rows, tokenizer.pad_token_id)

    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for index, row in enumerate(rows):
        single = model.generate(input_ids=torch.tensor([row]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert batched[index, -6:].tolist() == single[0, -6:].tolist()

    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    batched_logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    for index, row in enumerate(rows):
        single_logits = model(input_ids=torch.tensor([row])).logits[0]
        # another batch shape: every matmul may add in another order
        assert within(relative_error(batched_logits[index, -len(row) :], single_logits),
                      two_forwards(model.config, ids.shape[1]))


def test_rows_without_the_prefix_run_unchanged_with_one_warning_then_debug_lines(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    attach_intact_kv(model, [BOS], _scaled(capture_prefix_kv(model, [BOS]), 2.0))
    with_bos = _prompts(tokenizer, [BOS], (8,))[0]
    without_bos = with_bos[1:] + [5]
    ids = torch.tensor([with_bos, without_bos])
    with intact_kv_disabled(model):
        plain = model(input_ids=ids).logits

    messages: list[str] = []
    sink = logger.add(messages.append, level="DEBUG", format="{level} {message}")
    try:
        mixed = model(input_ids=ids).logits
        model(input_ids=ids)
        model(input_ids=ids[1:])
    finally:
        logger.remove(sink)

    torch.testing.assert_close(mixed[1], plain[1], atol=0, rtol=0)
    assert beyond(relative_error(mixed[0], plain[0]), 10 * two_forwards(model.config, ids.shape[1]))  # 10x rounding's
    reports = [m.split(" prompts")[0] for m in messages if "do not start with the stored prefix" in m]
    assert reports == ["WARNING IntactKV: 1 of 2", "DEBUG IntactKV: 1 of 2", "DEBUG IntactKV: 1 of 1"]


def test_prefix_off_position_zero_is_not_spliced(tiny_model_dirs):
    """Left padding without position ids puts the prefix at later positions, where the stored RoPE would be wrong."""
    model = load(tiny_model_dirs["llama"])
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    attach_intact_kv(model, [BOS], _scaled(capture_prefix_kv(model, [BOS]), 2.0))
    ids, mask = left_pad(_prompts(tokenizer, [BOS], (3, 8)), tokenizer.pad_token_id)
    with intact_kv_disabled(model):
        plain = model(input_ids=ids, attention_mask=mask).logits
    spliced = model(input_ids=ids, attention_mask=mask).logits

    torch.testing.assert_close(spliced[0], plain[0], atol=0, rtol=0)
    assert beyond(relative_error(spliced[1], plain[1]), 10 * two_forwards(model.config, ids.shape[1]))  # 10x rounding's


def test_threads_sharing_a_model_get_their_own_prefill_plans(tiny_model_dirs):
    """Threads x prompts with and without the prefix, greedy: every result equals the serial one.

    One thread also runs under ``intact_kv_disabled``, which must not switch IntactKV off for the others.
    """
    model = load(tiny_model_dirs["llama"])
    tokenizer = load_tokenizer(tiny_model_dirs["llama"])
    attach_intact_kv(model, [BOS], _scaled(capture_prefix_kv(model, [BOS]), 3.0))
    with_bos = _prompts(tokenizer, [BOS], (5, 9, 7, 11))
    prompts = [row for rows in zip(with_bos, [row[1:] + [7] for row in with_bos]) for row in rows]
    jobs = [(prompt, False) for prompt in prompts] + [(with_bos[0], True)]

    def run(job: tuple[list[int], bool]) -> list[int]:
        prompt, disabled = job
        with intact_kv_disabled(model) if disabled else contextlib.nullcontext():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        return out[0].tolist()

    serial = [run(job) for job in jobs]
    assert serial[0] != serial[-1]  # the prefix changes the output, so a thread that loses it is seen
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for _ in range(3):
            assert list(pool.map(run, jobs)) == serial


def test_an_attention_that_bypasses_the_cache_argument_is_an_error(tiny_model_dirs):
    """A layer that writes its KV through another route would silently run with the quantized prefix."""
    model = load(tiny_model_dirs["llama"])
    attach_intact_kv(model, [BOS], capture_prefix_kv(model, [BOS]))
    attention = model.model.layers[1].self_attn
    forward = attention.forward

    def unwrapped_cache(*args, past_key_values=None, **kwargs):
        return forward(*args, past_key_values=getattr(past_key_values, "_inner", past_key_values), **kwargs)

    attention.forward = unwrapped_cache
    with pytest.raises(RuntimeError, match=r"attention layers \[1\] never wrote their KV"):
        model(input_ids=torch.tensor([[BOS, 5, 6]]))
    model(input_ids=torch.tensor([[5, 6]]))  # no prefix, no plan: nothing to apply
