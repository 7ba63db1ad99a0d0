"""The quantizer-neutral API: capture on the full-precision model, attach and calibrate on the quantized one, save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import PREFIX, assert_carries, assert_same_kv, logits, round_linear_weights
from tiny_models import calibration_dataset, load, load_tokenizer, run_python
from transformers import AutoModelForCausalLM

from intactkv_modifier import config_of, intact_kv_disabled
from intactkv_modifier.integrations import IntactPrefix
from intactkv_modifier.kv_readout import model_kv_for_prefix


@pytest.fixture(params=["llama", "gemma3"])
def architecture(request) -> str:
    return request.param


def test_the_stored_kv_are_the_full_precision_models_and_replace_the_quantized_ones(tiny_model_dirs, architecture):
    model = load(tiny_model_dirs[architecture])
    full_precision = model_kv_for_prefix(model, PREFIX)
    intact = IntactPrefix.capture(model, settings={"prefix_token_ids": PREFIX})
    round_linear_weights(model)
    own = model_kv_for_prefix(model, PREFIX)
    intact.attach(model)

    assert_carries(model, full_precision)
    assert not torch.equal(own.values[1], full_precision.values[1])  # the quantizer did change the prefix K/V
    with intact_kv_disabled(model):
        plain = logits(model)
    assert not torch.allclose(logits(model), plain)
    assert IntactPrefix.of(model) is intact


def test_the_saved_checkpoint_reloads_with_the_captured_kv(tiny_model_dirs, tmp_path):
    model = load(tiny_model_dirs["llama"])
    intact = IntactPrefix.capture(model, settings={"prefix_token_ids": PREFIX})
    round_linear_weights(model)
    intact.attach(model)
    expected = logits(model)
    model.save_pretrained(tmp_path / "ckpt")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager")
    assert_carries(reloaded, intact.prefix_kv)
    assert torch.allclose(logits(reloaded), expected, atol=1e-5)
    block = json.loads((tmp_path / "ckpt" / "config.json").read_text())["intactkv_config"]
    assert block["prefix_token_ids"] == PREFIX and (tmp_path / "ckpt" / "intactkv" / "prefix_kv.safetensors").exists()


def test_the_default_prefix_is_the_tokenizers_bos(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    intact = IntactPrefix.capture(model, load_tokenizer(tiny_model_dirs["llama"]))
    assert intact.prefix_token_ids == [1]


def test_capture_refuses_a_model_that_is_quantized_already(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match=r"needs the full-precision model.*'gptq'.*Capture before quantizing"):
        IntactPrefix.capture(model, settings={"prefix_token_ids": PREFIX})


def test_a_gguf_model_counts_as_full_precision(tiny_model_dirs):
    """transformers dequantizes GGUF weights to floating point when it loads them."""
    model = load(tiny_model_dirs["llama"])
    model.config.quantization_config = {"quant_method": "gguf"}
    assert IntactPrefix.capture(model, settings={"prefix_token_ids": PREFIX}).prefix_token_ids == PREFIX


def test_calibration_fits_the_prefix_and_records_the_fit_in_the_block(tiny_model_dirs):
    directory = tiny_model_dirs["llama"]
    model = load(directory)
    rows = calibration_dataset(load_tokenizer(directory), count=4, length=24)["input_ids"]
    settings = {"calibration": {"num_samples": 4, "epochs": 3, "lr": 1e-2}}
    intact = IntactPrefix.capture(model, load_tokenizer(directory), settings, calibration_data=rows)
    round_linear_weights(model, bits=2)
    intact.attach(model)
    fit = intact.calibrate(model)

    record = config_of(model).calibration
    assert record["mse_after"] < record["mse_before"] and record == fit.calibration and fit.seconds > 0
    intact.attach(model)  # the capture back: the A/B baseline of +Cal on the same weights
    assert_carries(model, intact.prefix_kv)
    assert config_of(model).calibration is None


def test_calibration_without_recorded_targets_says_how_to_record_them(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    intact = IntactPrefix.capture(model, settings={"prefix_token_ids": PREFIX})
    intact.attach(model)
    with pytest.raises(ValueError, match="calibration_data="):
        intact.calibrate(model)


def test_calibration_data_that_misses_the_prefix_is_refused_at_capture(tiny_model_dirs):
    model = load(tiny_model_dirs["llama"])
    rows = torch.randint(10, 100, (4, 16))
    with pytest.raises(ValueError, match="start with the prefix"):
        IntactPrefix.capture(model, settings={"prefix_token_ids": PREFIX, "calibration": {"num_samples": 4}},
                             calibration_data=rows)


def test_a_model_that_carries_a_prefix_is_captured_as_it_computes_itself(tiny_model_dirs):
    """Rounded float weights are full precision to the capture; the prefix it carries must not be read back."""
    model = load(tiny_model_dirs["llama"])
    first = IntactPrefix.capture(model, settings={"prefix_token_ids": PREFIX})
    round_linear_weights(model)
    first.attach(model)
    again = IntactPrefix.capture(model, settings={"prefix_token_ids": PREFIX})
    with intact_kv_disabled(model):
        assert_same_kv(again.prefix_kv, model_kv_for_prefix(model, PREFIX))
    assert not torch.equal(again.prefix_kv.values[1], first.prefix_kv.values[1])


_WITHOUT_LLMCOMPRESSOR = r"""
import json, sys
sys.modules["llmcompressor"] = None  # an environment with optimum or quanto, without llm-compressor
sys.path[:0] = sys.argv[2:4]
import torch
from helpers import PREFIX, round_linear_weights
from tiny_models import load
from transformers import AutoModelForCausalLM
from intactkv_modifier import prefix_kv_of
from intactkv_modifier.integrations import IntactPrefix

model = load(sys.argv[1])
intact = IntactPrefix.capture(model, settings={"prefix_token_ids": PREFIX})
round_linear_weights(model)
intact.attach(model)
model.save_pretrained(sys.argv[4])
reloaded = AutoModelForCausalLM.from_pretrained(sys.argv[4])
print("RESULT " + json.dumps({
    "llmcompressor_loaded": sys.modules.get("llmcompressor") is not None,
    "same": all(torch.equal(a, b) for a, b in zip(prefix_kv_of(reloaded).keys, intact.prefix_kv.keys)),
}))
"""


def test_the_neutral_api_needs_no_llmcompressor(tiny_model_dirs, tmp_path):
    here = Path(__file__).parent
    report = run_python(_WITHOUT_LLMCOMPRESSOR, str(tiny_model_dirs["llama"]), str(here), str(here.parent),
                        str(tmp_path / "ckpt"))
    assert report == {"llmcompressor_loaded": False, "same": True}
