"""optimum-quanto: quantize/freeze with the prefix captured before, save, and reload with it."""

from __future__ import annotations

import pytest
import torch
from helpers import PREFIX, assert_carries, logits
from tiny_models import calibration_dataset, load, load_tokenizer

quanto = pytest.importorskip("optimum.quanto")

from intactkv_modifier import config_of  # noqa: E402
from intactkv_modifier.integrations import IntactPrefix  # noqa: E402
from intactkv_modifier.integrations.quanto import IntactKVQuantizedModelForCausalLM  # noqa: E402
from intactkv_modifier.kv_readout import model_kv_for_prefix  # noqa: E402
from intactkv_modifier.runtime import IntactKVRuntime  # noqa: E402


@pytest.mark.parametrize("weights", ["qint4", "qint2"])
def test_the_class_keeps_the_full_precision_prefix_through_save_and_reload(tiny_model_dirs, tmp_path, weights):
    model = load(tiny_model_dirs["llama"])
    full_precision = model_kv_for_prefix(model, PREFIX)
    qmodel = IntactKVQuantizedModelForCausalLM.quantize(
        model, weights=getattr(quanto, weights), exclude="lm_head", intactkv={"prefix_token_ids": PREFIX}
    )
    assert type(model.model.layers[0].mlp.up_proj).__module__.startswith("optimum.quanto")
    assert_carries(qmodel, full_precision)
    expected = logits(qmodel)
    qmodel.save_pretrained(tmp_path / "ckpt")

    reloaded = IntactKVQuantizedModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert_carries(reloaded, full_precision)
    assert torch.allclose(logits(reloaded), expected, atol=1e-5)


def test_the_plain_quanto_class_reloads_without_the_prefix(tiny_model_dirs, tmp_path):
    """optimum-quanto rebuilds the model from its config, bypassing from_pretrained: why the subclass exists."""
    qmodel = IntactKVQuantizedModelForCausalLM.quantize(
        load(tiny_model_dirs["llama"]), weights=quanto.qint4, exclude="lm_head", intactkv={"prefix_token_ids": PREFIX}
    )
    qmodel.save_pretrained(tmp_path / "ckpt")
    plain = quanto.QuantizedModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert config_of(plain._wrapped) is not None and IntactKVRuntime.of(plain._wrapped) is None


def test_quantize_and_freeze_by_hand_with_calibration(tiny_model_dirs, tmp_path):
    """The functional path: capture, quanto's quantize/freeze, attach, fit; quanto's int2 kernels pass gradients."""
    directory = tiny_model_dirs["llama"]
    model = load(directory)
    tokenizer = load_tokenizer(directory)
    settings = {"calibration": {"num_samples": 4, "epochs": 3, "lr": 1e-3}}
    intact = IntactPrefix.capture(model, tokenizer, settings, calibration_dataset(tokenizer)["input_ids"])
    quanto.quantize(model, weights=quanto.qint2, exclude="lm_head")
    quanto.freeze(model)
    intact.attach(model)
    record = intact.calibrate(model).calibration
    assert record["mse_after"] < record["mse_before"] and config_of(model).calibration == record
