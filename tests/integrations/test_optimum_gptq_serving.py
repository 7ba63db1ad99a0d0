"""A GPTQ checkpoint made through optimum, served by vLLM with the plugin: the intact prefix reaches vLLM's cache.

vLLM's CPU build serves optimum's GPTQ v1 format (4-bit, symmetric) here; on
the GPU machine the same test runs against vLLM there (see
``tests/test_vllm_engine.py`` for how the serving interpreter is found). On the
tiny model, W4 moves the prefix K/V so little that the log-probabilities with
and without them differ by less than two bfloat16 runs do (~0.02), so a second
checkpoint carries a deliberately shifted prefix: vLLM must follow it, far
from the plain model, on the GPTQ kernels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import PREFIX
from test_vllm_engine import BF16_LOGPROB, Served, assert_matches, engine, references, serving_python
from tiny_models import load, load_tokenizer

from intactkv_modifier import attach_intact_kv, prefix_kv_of
from intactkv_modifier.eval.vllm_runs import run_engine
from intactkv_modifier.prefix_kv import PrefixKV

pytestmark = pytest.mark.serving
pytest.importorskip("optimum.gptq")
pytest.importorskip("gptqmodel")


def served(model, prompts: list[list[int]], folder: Path, tokenizer_dir: Path, quantizer) -> Served:
    quantizer.save(model, str(folder))
    for tokenizer_file in tokenizer_dir.glob("tokenizer*"):
        shutil.copy(tokenizer_file, folder)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    return Served(folder, PREFIX, prompts, *references(reloaded, prompts))


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dirs, tmp_path_factory) -> tuple[Served, Served]:
    """The checkpoint as IntactKVGPTQQuantizer writes it, and the same weights with a shifted stored prefix."""
    from test_optimum_gptq import calibration_rows

    from intactkv_modifier.integrations.optimum_gptq import IntactKVGPTQQuantizer

    serving_python()  # skip before quantizing when there is nothing to serve with
    directory = tiny_model_dirs["llama"]
    quantizer = IntactKVGPTQQuantizer(
        bits=4, group_size=32, dataset=calibration_rows(directory), model_seqlen=64,
        intactkv={"prefix_token_ids": PREFIX},
    )
    model = quantizer.quantize_model(load(directory), load_tokenizer(directory))
    generator = torch.Generator().manual_seed(3)
    words = [torch.randint(4, 124, (21,), generator=generator).tolist() for _ in range(4)]
    prompts = [PREFIX + w for w in words] + [w[:2] + PREFIX + w[2:] for w in words[:2]]
    root = tmp_path_factory.mktemp("optimum-gptq-served")
    as_made = served(model, prompts, root / "as-made", directory, quantizer)

    stored = prefix_kv_of(model)
    shifted = PrefixKV(
        keys=[k + 0.5 * torch.randn(k.shape, generator=generator) for k in stored.keys],
        values=[v + 2.0 * torch.randn(v.shape, generator=generator) for v in stored.values],
    )
    attach_intact_kv(model, PREFIX, shifted)
    return as_made, served(model, prompts, root / "shifted", directory, quantizer)


def test_vllm_serves_the_optimum_gptq_checkpoint_with_its_intact_prefix(checkpoints):
    as_made, _ = checkpoints
    answer = run_engine(serving_python(), engine(as_made))
    ours = [line for line in answer.log.splitlines() if "IntactKV:" in line]
    assert any("read back exactly" in line for line in ours), answer.log[-3000:]
    first_passes, _ = answer.results
    for first in first_passes:
        for index in range(len(as_made.prompts)):
            want = as_made.intact[index] if as_made.starts_with_prefix(index) else as_made.plain[index]
            assert max(abs(lp - float(want[-1, int(t)])) for t, lp in first[index].items()) < BF16_LOGPROB


def test_vllm_follows_the_stored_prefix_on_the_gptq_kernels(checkpoints):
    _, shifted = checkpoints
    assert_matches(shifted, run_engine(serving_python(), engine(shifted)), with_prefix=True)
