"""optimum's GPTQ through ``IntactKVGPTQQuantizer``: the prefix captured in full precision, saved, reloaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import PREFIX, assert_carries, assert_same_kv, logits
from tiny_models import load, load_tokenizer, text_samples

pytest.importorskip("optimum.gptq")
pytest.importorskip("gptqmodel")

from transformers import AutoModelForCausalLM  # noqa: E402

from intactkv_modifier import config_of, intact_kv_disabled, prefix_kv_of  # noqa: E402
from intactkv_modifier.integrations import IntactPrefix  # noqa: E402
from intactkv_modifier.integrations.optimum_gptq import IntactKVGPTQQuantizer  # noqa: E402
from intactkv_modifier.kv_readout import model_kv_for_prefix  # noqa: E402
from intactkv_modifier.prefix_kv import PrefixKV  # noqa: E402


@dataclass(frozen=True)
class Quantized:
    model: torch.nn.Module
    quantizer: IntactKVGPTQQuantizer
    full_precision: PrefixKV
    folder: Path
    before_save: torch.Tensor


def calibration_rows(directory: Path, count: int = 4) -> list[dict[str, torch.Tensor]]:
    """Tokenized samples as optimum takes them, each starting with the prefix."""
    tokenizer = load_tokenizer(directory)
    rows = [PREFIX + tokenizer(text, add_special_tokens=False)["input_ids"] for text in text_samples(count, 24)]
    return [{"input_ids": torch.tensor([row]), "attention_mask": torch.ones(1, len(row), dtype=torch.long)}
            for row in rows]


@pytest.fixture(scope="module")
def quantized(tiny_model_dirs, tmp_path_factory) -> Quantized:
    directory = tiny_model_dirs["llama"]
    model = load(directory)
    full_precision = model_kv_for_prefix(model, PREFIX)
    quantizer = IntactKVGPTQQuantizer(
        bits=4, group_size=32, dataset=calibration_rows(directory), model_seqlen=64,
        intactkv={"prefix_token_ids": PREFIX, "calibration": {"num_samples": 4, "epochs": 3, "lr": 1e-3}},
    )
    model = quantizer.quantize_model(model, load_tokenizer(directory))
    before_save = logits(model)
    folder = tmp_path_factory.mktemp("gptq") / "tiny-gptq-w4"
    quantizer.save(model, str(folder))
    return Quantized(model, quantizer, full_precision, folder, before_save)


def test_the_capture_is_the_full_precision_models_kv(quantized):
    intact = IntactPrefix.of(quantized.model)
    assert intact is quantized.quantizer.intact_prefix
    assert_same_kv(intact.prefix_kv, quantized.full_precision)
    assert type(quantized.model.model.layers[0].self_attn.q_proj).__module__.startswith("gptqmodel")


def test_calibration_ran_through_the_gptq_kernels(quantized):
    record = config_of(quantized.model).calibration
    assert record["mse_after"] < record["mse_before"]


def test_the_checkpoint_reloads_with_its_prefix_and_the_same_outputs(quantized):
    reloaded = AutoModelForCausalLM.from_pretrained(quantized.folder, dtype=torch.float32)
    assert config_of(reloaded).calibration == config_of(quantized.model).calibration
    assert_carries(reloaded, prefix_kv_of(quantized.model))  # the calibrated prefix, as attached
    on = logits(reloaded)
    with intact_kv_disabled(reloaded):
        off = logits(reloaded)
    # gptqmodel's CPU kernel repacks the loaded weights with bfloat16 scales: not bit-exact, but the prefix is used
    assert (on - quantized.before_save).abs().max() < (off - quantized.before_save).abs().max()
    assert torch.allclose(on, quantized.before_save, atol=1e-2)


def test_config_json_names_the_format_the_weights_are_in(quantized):
    """optimum 2.3.0 writes gptq_v2 there over v1 weights; transformers would reload them one step off."""
    config = json.loads((quantized.folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == json.loads((quantized.folder / "quantize_config.json").read_text())["format"] == "gptq"
    assert config["dataset"] is None  # the tokenized samples are tensors: not JSON
    assert config["bits"] == 4 and config["group_size"] == 32


def test_the_model_computes_as_before_once_saved(quantized, tmp_path):
    assert torch.equal(logits(quantized.model), quantized.before_save)
    quantized.quantizer.save(quantized.model, str(tmp_path / "again"))  # a second save writes the same weights
    weights = "model.safetensors"
    assert (tmp_path / "again" / weights).read_bytes() == (quantized.folder / weights).read_bytes()


def test_a_dataset_name_cannot_feed_the_calibration(tiny_model_dirs):
    quantizer = IntactKVGPTQQuantizer(bits=4, dataset="wikitext2", intactkv={"calibration": {"num_samples": 2}})
    with pytest.raises(ValueError, match="token-id rows or texts"):
        quantizer.quantize_model(load(tiny_model_dirs["llama"]), load_tokenizer(tiny_model_dirs["llama"]))
