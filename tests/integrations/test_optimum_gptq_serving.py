"""A GPTQ checkpoint made through optimum, served by vLLM with the plugin: the intact prefix reaches vLLM's cache.

vLLM's CPU build serves optimum's GPTQ v1 format (4-bit, symmetric) in
bfloat16 (``tests/test_vllm_engine.py`` says how the serving interpreter is
found). On a tiny model W4 moves the prefix K/V less than vLLM's and
transformers' bfloat16 kernels differ, so, as the other engine tests do, the
checkpoint ``IntactKVGPTQQuantizer.save`` writes carries a prefix shifted far
from the model's own: vLLM, on the GPTQ kernels, must follow transformers with
that prefix.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import PREFIX
from test_optimum_gptq import calibration_rows
from test_vllm_engine import Served, assert_follows, engine, references, serving_4bit_python, serving_python
from tiny_models import load, load_tokenizer

from intactkv_modifier import attach_intact_kv, prefix_kv_of
from intactkv_modifier.eval.vllm_runs import run_engine
from intactkv_modifier.prefix_kv import PrefixKV

pytestmark = pytest.mark.serving
pytest.importorskip("optimum.gptq")
pytest.importorskip("gptqmodel")

from intactkv_modifier.integrations.optimum_gptq import IntactKVGPTQQuantizer  # noqa: E402


def shifted(prefix_kv: PrefixKV, generator: torch.Generator) -> PrefixKV:
    """The stored K/V moved far from the model's own, as ``tests/test_vllm_engine.py`` moves them."""
    return PrefixKV(
        keys=[k + 0.5 * torch.randn(k.shape, generator=generator) for k in prefix_kv.keys],
        values=[v + 2.0 * torch.randn(v.shape, generator=generator) for v in prefix_kv.values],
    )


@pytest.fixture(scope="module")
def gptq_checkpoint(tiny_model_dirs, tmp_path_factory) -> Served:
    """The tiny Llama through IntactKVGPTQQuantizer (W4 g32), its stored prefix shifted, saved by the quantizer."""
    serving_4bit_python()  # skip before quantizing when there is nothing to serve it with
    directory = tiny_model_dirs["llama"]
    quantizer = IntactKVGPTQQuantizer(
        bits=4, group_size=32, dataset=calibration_rows(directory), model_seqlen=64,
        intactkv={"prefix_token_ids": PREFIX},
    )
    model = quantizer.quantize_model(load(directory), load_tokenizer(directory))
    generator = torch.Generator().manual_seed(3)
    attach_intact_kv(model, PREFIX, shifted(prefix_kv_of(model), generator))
    folder = tmp_path_factory.mktemp("optimum-gptq-served") / "tiny-gptq-w4"
    quantizer.save(model, str(folder))  # float32 (a GPTQ model cannot be cast); vLLM and the reference load bf16
    for tokenizer_file in Path(directory).glob("tokenizer*"):
        shutil.copy(tokenizer_file, folder)

    from transformers import AutoModelForCausalLM

    words = [torch.randint(4, 124, (21,), generator=generator).tolist() for _ in range(4)]
    prompts = [PREFIX + w for w in words] + [w[:2] + PREFIX + w[2:] for w in words[:2]]
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    return Served(folder, PREFIX, prompts, *references(reloaded, prompts))


def test_vllm_serves_the_optimum_gptq_checkpoint_with_its_intact_prefix(gptq_checkpoint):
    """One engine (the plugin off is tested on plain checkpoints in tests/test_vllm_engine.py): every prompt with
    the prefix follows transformers with the stored prefix, fresh and from vLLM's prefix cache, at every position."""
    answer = run_engine(serving_python(), engine(gptq_checkpoint))
    ours = [line for line in answer.log.splitlines() if "IntactKV:" in line]
    assert any("read back exactly" in line for line in ours), answer.log[-3000:]
    assert_follows(gptq_checkpoint, answer, intact=True)
