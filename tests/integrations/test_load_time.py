"""transformers' load-time quantizers: the prefix captured from a full-precision load, attached to the quantized one."""

from __future__ import annotations

import pytest
import torch
from helpers import PREFIX, assert_carries, logits
from tiny_models import load
from transformers import AutoModelForCausalLM, TorchAoConfig

pytest.importorskip("torchao")
from torchao.quantization import IntxWeightOnlyConfig  # noqa: E402
from torchao.quantization.granularity import PerGroup  # noqa: E402

from intactkv_modifier import config_of  # noqa: E402
from intactkv_modifier.integrations import load_quantized  # noqa: E402
from intactkv_modifier.kv_readout import model_kv_for_prefix  # noqa: E402

#: As ``tiny_models.load`` loads the full-precision reference, so the captured K/V are bit-equal to it.
EAGER_FLOAT32 = dict(dtype=torch.float32, attn_implementation="eager")


def torchao_int4() -> TorchAoConfig:
    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))


def test_torchao_int4_keeps_the_full_precision_prefix_through_save_and_reload(tiny_model_dirs, tmp_path):
    directory = tiny_model_dirs["llama"]
    full_precision = model_kv_for_prefix(load(directory), PREFIX)
    model = load_quantized(directory, torchao_int4(), intactkv={"prefix_token_ids": PREFIX}, **EAGER_FLOAT32)
    assert type(model.model.layers[0].mlp.up_proj.weight).__module__.startswith("torchao")
    assert_carries(model, full_precision)
    expected = logits(model)
    model.save_pretrained(tmp_path / "ckpt")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", **EAGER_FLOAT32)
    assert_carries(reloaded, full_precision)
    assert torch.equal(logits(reloaded), expected)


def test_torchao_int4_passes_gradients_for_the_calibration(tiny_model_dirs):
    directory = tiny_model_dirs["llama"]
    rows = torch.tensor([PREFIX + list(range(10 + shift, 30 + shift)) for shift in (0, 50)])
    settings = {"prefix_token_ids": PREFIX, "calibration": {"num_samples": 2, "epochs": 3, "lr": 1e-3}}
    model = load_quantized(directory, torchao_int4(), intactkv=settings, calibration_data=rows, **EAGER_FLOAT32)
    record = config_of(model).calibration
    assert record["mse_after"] < record["mse_before"]
