"""Gemma 3 mechanics on a tiny random config: one KV head, QK-norm, tied embeddings, sliding-window layers.

The real model (gemma-3-270m) needs a 240 MB download; these tests keep what it relies on tested
without it: capture, calibration, the compressed checkpoint, decoding past the sliding window, and
the chunked perplexity its 262k-token vocabulary needs.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_calibration import FAST
from test_modifier import gptq, quantize
from tiny_models import BOS, GEMMA3_SLIDING_WINDOW, left_pad, load, load_tokenizer, text_samples
from tolerances import beyond, relative_error, two_forwards, two_perplexities, within

from intactkv_modifier import (
    IntactKVModifier,
    attach_intact_kv,
    capture_prefix_kv,
    intact_kv_disabled,
    prefix_kv_of,
)
from intactkv_modifier.eval.perplexity import perplexity, token_windows

pytestmark = pytest.mark.numerics  # CI runs these under other CPU kernels and thread counts too

LONG = 2 * GEMMA3_SLIDING_WINDOW + 5  # prompts that run past the sliding window


@pytest.fixture(scope="module")
def gemma_checkpoint(tiny_model_dirs, tmp_path_factory):
    """GPTQ W4A16 + IntactKV+Cal on the tiny Gemma 3, saved compressed and loaded back."""
    model_dir = tiny_model_dirs["gemma3"]
    model = quantize(model_dir, [gptq(), IntactKVModifier(calibration=FAST)], samples=16)
    out = tmp_path_factory.mktemp("gemma3-ckpt")
    model.save_pretrained(out, save_compressed=True)
    load_tokenizer(model_dir).save_pretrained(out)
    return model, load(out), out


def _prompt(tokenizer, length: int, seed: int) -> list[int]:
    return tokenizer(text_samples(1, length - 1, seed=seed)[0])["input_ids"]


def test_calibrated_prefix_survives_the_compressed_checkpoint(gemma_checkpoint):
    model, reloaded, _ = gemma_checkpoint
    for saved, loaded in zip(prefix_kv_of(model).keys + prefix_kv_of(model).values,
                             prefix_kv_of(reloaded).keys + prefix_kv_of(reloaded).values):
        assert loaded.shape == (1, 1, 32)  # one KV head, one prefix token, head_dim 32
        assert torch.equal(saved, loaded)
    ids = torch.tensor([[BOS, 5, 6, 7, 8]])
    with torch.no_grad():
        # bit-identical weights and prefix, the same forward: the same sums in the same order
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
        with intact_kv_disabled(reloaded):
            plain = reloaded(input_ids=ids).logits
    # the calibrated prefix's effect: ten times what rounding could do
    assert beyond(relative_error(plain, reloaded(input_ids=ids).logits), 10 * two_forwards(model.config, ids.shape[1]))


def test_generation_past_the_sliding_window_reuses_the_prefix(gemma_checkpoint, tiny_model_dirs):
    """Greedy decoding with the cache equals recomputing every step without one, beyond the window."""
    _, model, _ = gemma_checkpoint
    ids = torch.tensor([_prompt(load_tokenizer(tiny_model_dirs["gemma3"]), LONG, seed=3)])
    generated = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    recomputed = ids
    with torch.no_grad():
        for _ in range(6):
            next_token = model(input_ids=recomputed, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            recomputed = torch.cat([recomputed, next_token], dim=1)
    assert torch.equal(generated, recomputed)


def test_left_padded_batch_past_the_window_equals_unbatched(gemma_checkpoint, tiny_model_dirs):
    _, model, _ = gemma_checkpoint
    tokenizer = load_tokenizer(tiny_model_dirs["gemma3"])
    prompts = [_prompt(tokenizer, LONG, seed=4), _prompt(tokenizer, 9, seed=5)]
    ids, mask = left_pad(prompts, pad=0)
    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate(prompts):
        alone = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert batched[row, ids.shape[1]:].tolist() == alone[0, len(prompt):].tolist()


@pytest.mark.parametrize("prefix_length", [1, GEMMA3_SLIDING_WINDOW + 4])
def test_full_precision_model_with_its_own_prefix_past_the_window_is_unchanged(tiny_model_dirs, prefix_length):
    """Also a prefix longer than the sliding window (a long system prompt): every layer stores all its positions."""
    model = load(tiny_model_dirs["gemma3"])
    ids = torch.tensor([_prompt(load_tokenizer(tiny_model_dirs["gemma3"]), LONG, seed=6)])
    prefix = ids[0, :prefix_length].tolist()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        kv = capture_prefix_kv(model, prefix)
        assert {tuple(k.shape) for k in kv.keys + kv.values} == {(1, prefix_length, model.config.head_dim)}
        attach_intact_kv(model, prefix, kv)
        # the prefix K/V come from a forward of the prefix alone (another matmul shape), the rest is the same
        assert within(relative_error(model(input_ids=ids).logits, plain), two_forwards(model.config, ids.shape[1]))


@pytest.mark.parametrize(("architecture", "softcap"), [("llama", None), ("gemma3", None), ("gemma3", 3.0)])
def test_chunked_perplexity_equals_the_models_own_loss(tiny_model_dirs, architecture, softcap):
    model = load(tiny_model_dirs[architecture])
    windows = token_windows(load_tokenizer(tiny_model_dirs[architecture]), " ".join(text_samples(8, 40)), [BOS], 24, 5)
    with torch.no_grad():
        largest_logit = float(model(input_ids=windows).logits.abs().max())  # the head's, before any capping
    if softcap:
        model.config.final_logit_softcapping = softcap  # Gemma's optional capping; gemma-3-270m has none
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    got = perplexity(model, windows, batch_size=2, chunk_tokens=7)
    # batches of 2 and head chunks of 7 positions against one forward: the same sums in other shapes
    bound = two_perplexities(model.config, windows.shape[1], largest_logit)
    assert within(abs(got / math.exp(float(expected)) - 1), bound)


def test_perplexity_of_a_freshly_loaded_compressed_checkpoint(gemma_checkpoint, tiny_model_dirs):
    """A compressed checkpoint decompresses on its first full forward: perplexity must go through it."""
    windows = token_windows(load_tokenizer(tiny_model_dirs["gemma3"]), " ".join(text_samples(8, 40)), [BOS], 24, 4)
    fresh = load(gemma_checkpoint[2])
    got = perplexity(fresh, windows, batch_size=2, chunk_tokens=5)
    with torch.no_grad():
        output = fresh(input_ids=windows, labels=windows)
    # batches of 2 and head chunks of 5 positions against one forward: the same sums in other shapes
    bound = two_perplexities(fresh.config, windows.shape[1], float(output.logits.abs().max()))
    assert within(abs(got / math.exp(float(output.loss)) - 1), bound)
