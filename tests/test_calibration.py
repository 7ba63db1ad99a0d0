"""IntactKV+Cal: the stored K/V are fitted, and nothing else moves."""

from __future__ import annotations

import json

import pytest
import torch
from llmcompressor.modifiers.quantization import GPTQModifier
from test_modifier import gptq, quantize
from tiny_models import BOS, load, load_tokenizer, text_samples
from tolerances import EPS32, beyond, two_forwards, two_mses, within

from intactkv_modifier import CONFIG_KEY, IntactKVModifier, attach_intact_kv, capture_prefix_kv, prefix_kv_of
from intactkv_modifier.calibration import (
    CalibrationSettings,
    CalibrationTargets,
    _batch_loss,
    _equal_length_batches,
    calibrate_prefix_kv,
    prefix_mse,
    record_targets,
)

pytestmark = pytest.mark.numerics  # CI runs these under other CPU kernels and thread counts too

FAST = CalibrationSettings(num_samples=16, epochs=5, lr=1e-2, seed=0)


@pytest.fixture(scope="module")
def quantized(tiny_model_dirs):
    return quantize(tiny_model_dirs["llama"], [gptq(), IntactKVModifier()], samples=8)


def _targets(model_dir, seed: int, count: int, loss: str = "final_hidden"):
    """FP hidden states on ``count`` samples; seed 1 is the calibration set's, others are held out."""
    encoded = load_tokenizer(model_dir)(text_samples(count, 24, seed=seed), return_tensors="pt")
    rows = [{"input_ids": i, "attention_mask": m} for i, m in zip(encoded["input_ids"], encoded["attention_mask"])]
    return record_targets(load(model_dir), rows, [BOS], num_samples=count, loss=loss)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in model.state_dict().items()}


def test_calibration_lowers_heldout_loss_and_changes_no_weight(tiny_model_dirs, quantized):
    model_dir = tiny_model_dirs["llama"]
    heldout = _targets(model_dir, seed=99, count=6)
    weights_before = _weights(quantized)
    before = prefix_mse(quantized, heldout)
    # buffers of an offloaded model are updated in place
    stored_keys = [k.clone() for k in prefix_kv_of(quantized).keys]

    calibrated = calibrate_prefix_kv(quantized, _targets(model_dir, seed=1, count=16), FAST)
    attach_intact_kv(quantized, [BOS], calibrated)

    assert prefix_mse(quantized, heldout) < before
    assert any(not torch.equal(a, b) for a, b in zip(stored_keys, calibrated.keys))
    weights_after = _weights(quantized)
    assert weights_after.keys() == weights_before.keys()
    for name, tensor in weights_before.items():
        assert torch.equal(tensor, weights_after[name]), name


def test_calibration_is_deterministic(tiny_model_dirs, quantized):
    targets = _targets(tiny_model_dirs["llama"], seed=1, count=16)
    first = calibrate_prefix_kv(quantized, targets, FAST)
    second = calibrate_prefix_kv(quantized, targets, FAST)
    for a, b in zip(first.keys + first.values, second.keys + second.values):
        assert torch.equal(a, b)


@pytest.mark.parametrize("settings", [FAST, CalibrationSettings.reference(num_samples=16, epochs=5, lr=1e-2)])
def test_modifier_calibrates_and_the_checkpoint_round_trips(tiny_model_dirs, tmp_path, settings):
    model = quantize(tiny_model_dirs["llama"], [gptq(), IntactKVModifier(calibration=settings)], samples=16)
    model.save_pretrained(tmp_path, save_compressed=True)
    record = json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY]["calibration"]
    assert record["epochs"] == settings.epochs and record["mse_after"] < record["mse_before"]
    assert record["loss"] == settings.loss and record["gradient_accumulation"] == settings.gradient_accumulation
    reloaded = load(tmp_path)
    for a, b in zip(prefix_kv_of(model).keys, prefix_kv_of(reloaded).keys):
        assert torch.equal(a, b)


def test_asking_for_more_samples_than_the_data_holds_fails_clearly(tiny_model_dirs):
    too_many = CalibrationSettings(num_samples=50, epochs=1)
    with pytest.raises(ValueError, match="asked for 50 samples but the calibration data holds only 4"):
        quantize(tiny_model_dirs["llama"], [gptq(), IntactKVModifier(calibration=too_many)], samples=4)


def test_batches_hold_samples_of_one_length_each_once():
    lengths = [5, 7, 5, 5, 7, 5, 9]
    targets = CalibrationTargets(input_ids=[torch.zeros(n, dtype=torch.long) for n in lengths], hidden_states=[],
                                 prefix_length=1)
    batches = _equal_length_batches(targets, [6, 0, 1, 2, 3, 4, 5], batch_size=2)
    assert batches == [[6], [0, 2], [1, 4], [3, 5]]


def test_a_batch_loss_is_the_mean_of_its_samples_losses(tiny_model_dirs, quantized):
    targets = _targets(tiny_model_dirs["llama"], seed=1, count=16)
    same_length = next(batch for batch in _equal_length_batches(targets, list(range(16)), 16) if len(batch) > 1)
    with torch.no_grad():
        batched = float(_batch_loss(quantized, targets, same_length))
        singles = [float(_batch_loss(quantized, targets, [i])) for i in same_length]
    mean = sum(singles) / len(singles)
    largest = max(float(targets.hidden_states[i][:, targets.prefix_length :].abs().max()) for i in same_length)
    # one batch against single samples: the same sums in other matmul shapes, against fixed targets
    bound = two_mses(quantized.config, targets.input_ids[same_length[0]].numel(), largest, mean)
    assert within(abs(batched / mean - 1), bound)


def test_every_layer_targets_are_each_layers_output_and_zero_for_the_fp_model(tiny_model_dirs, quantized):
    model_dir = tiny_model_dirs["llama"]
    targets = _targets(model_dir, seed=1, count=4, loss="every_layer")
    fp = load(model_dir)
    layers = fp.config.num_hidden_layers
    assert targets.hidden_states[0].shape == (layers, targets.input_ids[0].numel(), fp.config.hidden_size)
    with torch.no_grad():
        first_layer = fp.model(input_ids=targets.input_ids[0][None], output_hidden_states=True).hidden_states[1][0]
        assert torch.equal(targets.hidden_states[0][0], first_layer)
        attach_intact_kv(fp, [BOS], capture_prefix_kv(fp, [BOS]))
        # only the spliced K/V round otherwise (computed for the prefix alone): each layer's MSE / 2 at most d**2 / 2
        largest = max(float(hidden[:, targets.prefix_length :].abs().max()) for hidden in targets.hidden_states)
        drift = two_forwards(fp.config, max(ids.numel() for ids in targets.input_ids)) * largest
        assert within(prefix_mse(fp, targets), layers * drift**2 / 2)
    assert beyond(prefix_mse(quantized, targets), layers * drift**2 / 2)  # W4 weights: far beyond rounding


def test_every_layer_calibration_lowers_heldout_loss(tiny_model_dirs, quantized):
    heldout = _targets(tiny_model_dirs["llama"], seed=99, count=6, loss="every_layer")
    before = prefix_mse(quantized, heldout)
    original = prefix_kv_of(quantized)
    settings = CalibrationSettings.reference(num_samples=16, epochs=10, lr=1e-2, gradient_accumulation=4)
    calibrated = calibrate_prefix_kv(quantized, _targets(tiny_model_dirs["llama"], 1, 16, "every_layer"), settings)
    attach_intact_kv(quantized, [BOS], calibrated)
    try:
        assert prefix_mse(quantized, heldout) < before
    finally:
        attach_intact_kv(quantized, [BOS], original)


def test_accumulated_micro_batches_make_the_same_step_as_one_batch(tiny_model_dirs, quantized):
    targets = _targets(tiny_model_dirs["llama"], seed=1, count=16)
    pair = next(batch for batch in _equal_length_batches(targets, list(range(16)), 2) if len(batch) == 2)
    two = CalibrationTargets([targets.input_ids[i] for i in pair], [targets.hidden_states[i] for i in pair], 1)
    one_batch = calibrate_prefix_kv(quantized, two, FAST.model_copy(update={"epochs": 1, "batch_size": 2}))
    accumulated = calibrate_prefix_kv(
        quantized, two, FAST.model_copy(update={"epochs": 1, "gradient_accumulation": 2, "max_grad_norm": 0.3})
    )
    single_step = calibrate_prefix_kv(quantized, two, FAST.model_copy(update={"epochs": 1}))

    def bound(kv: torch.Tensor) -> float:
        """Adam's first step, lr g / (|g| + eps), moves by lr times the gradients' relative drift (the backward
        reorders the forward's sums); the update rounds once, eps of the K/V."""
        return FAST.lr * two_forwards(quantized.config, two.input_ids[0].numel()) + EPS32 * float(kv.abs().max())

    for a, b in zip(one_batch.keys, accumulated.keys):
        assert within(float((a - b).abs().max()), bound(a))
    assert any(beyond(float((a - c).abs().max()), bound(a)) for a, c in zip(one_batch.keys, single_step.keys))


def test_targets_recorded_for_another_loss_are_refused(tiny_model_dirs, quantized):
    targets = _targets(tiny_model_dirs["llama"], seed=1, count=4)
    with pytest.raises(ValueError, match="recorded for the 'final_hidden' loss"):
        calibrate_prefix_kv(quantized, targets, CalibrationSettings.reference(num_samples=4))


def test_batched_calibration_lowers_heldout_loss(tiny_model_dirs, quantized):
    heldout = _targets(tiny_model_dirs["llama"], seed=99, count=6)
    before = prefix_mse(quantized, heldout)
    original = prefix_kv_of(quantized)
    batched = FAST.model_copy(update={"batch_size": 4, "epochs": 10})
    calibrated = calibrate_prefix_kv(quantized, _targets(tiny_model_dirs["llama"], seed=1, count=16), batched)
    attach_intact_kv(quantized, [BOS], calibrated)
    try:
        assert prefix_mse(quantized, heldout) < before
    finally:
        attach_intact_kv(quantized, [BOS], original)


def test_calibration_through_fake_quantized_activations_fails_clearly(tiny_model_dirs):
    w8a8 = GPTQModifier(scheme="W8A8", targets="Linear", ignore=["lm_head"])
    with pytest.raises(RuntimeError, match="no gradient through this quantized model"):
        quantize(tiny_model_dirs["llama"], [w8a8, IntactKVModifier(calibration=FAST)], samples=16)
