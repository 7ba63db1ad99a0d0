"""IntactKVModifier inside real llm-compressor recipes: when it captures, what it stores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.modifiers.transform import SpinQuantModifier
from llmcompressor.recipe import Recipe
from pydantic import ValidationError
from tiny_models import BOS, calibration_dataset, load, load_tokenizer
from tolerances import beyond

import intactkv_modifier.recipes
from intactkv_modifier import IntactKVModifier, PrefixKV, capture_prefix_kv, intact_kv_disabled, prefix_kv_of
from intactkv_modifier.calibration import CalibrationSettings
from intactkv_modifier.chat_template import chat_system_part
from intactkv_modifier.kv_readout import model_kv_for_prefix

pytestmark = pytest.mark.numerics  # CI runs these under other CPU kernels and thread counts too

RECIPES = Path(intactkv_modifier.recipes.__file__).parent


def gptq() -> GPTQModifier:
    return GPTQModifier(scheme="W4A16", targets="Linear", ignore=["lm_head"])


def quantize(model_dir: Path, recipe, samples: int = 4) -> torch.nn.Module:
    model = load(model_dir)
    tokenizer = load_tokenizer(model_dir)
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=calibration_dataset(tokenizer, count=samples),
        recipe=recipe,
        num_calibration_samples=samples,
        max_seq_length=32,
    )
    return model


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def assert_same_kv(actual: PrefixKV, expected: PrefixKV) -> None:
    """Bit-identical: both captures run the same forward of the prefix on the same full-precision weights."""
    assert len(actual.keys) == len(expected.keys) and len(actual.values) == len(expected.values)
    assert all(torch.equal(a, e) for a, e in zip(actual.keys + actual.values, expected.keys + expected.values))


@pytest.mark.parametrize(
    ("architecture", "modifier"),
    [
        ("llama", IntactKVModifier()),
        ("qwen3", IntactKVModifier()),
        ("gemma3", IntactKVModifier()),
        ("qwen2", IntactKVModifier(prefix_token_ids=[11, 12, 13])),
    ],
)
def test_gptq_stores_full_precision_kv_not_quantized_kv(tiny_model_dirs, architecture, modifier):
    model_dir = tiny_model_dirs[architecture]
    prefix = modifier.prefix_token_ids or [BOS]
    full_precision = capture_prefix_kv(load(model_dir), prefix)

    model = quantize(model_dir, [gptq(), modifier])
    with intact_kv_disabled(model):
        quantized = model_kv_for_prefix(model, prefix)

    assert_same_kv(prefix_kv_of(model), full_precision)
    # 4-bit weights (steps of 1/15 of a group's range) move the K/V; rounding alone would leave them identical
    assert beyond(max_difference(quantized.keys, full_precision.keys), 1e-3)
    assert beyond(max_difference(quantized.values, full_precision.values), 1e-3)


def test_capture_does_not_depend_on_recipe_position(tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    after = prefix_kv_of(quantize(model_dir, [gptq(), IntactKVModifier()]))
    before = prefix_kv_of(quantize(model_dir, [IntactKVModifier(), gptq()]))
    assert_same_kv(before, after)


def gptq_observed_tokens(monkeypatch, model_dir: Path, recipe) -> dict[str, int]:
    """Tokens each GPTQ Hessian accumulated (GPTQ itself is not bit-deterministic across runs on CPU)."""
    seen: dict[int, int] = {}
    original = GPTQModifier.calibrate_module

    def counting(self, module, args, output):
        seen[id(module)] = seen.get(id(module), 0) + args[0].shape[:-1].numel()
        return original(self, module, args, output)

    monkeypatch.setattr(GPTQModifier, "calibrate_module", counting)
    model = quantize(model_dir, recipe, samples=8)
    names = {id(m): n for n, m in model.named_modules()}
    return {names[key]: count for key, count in seen.items()}


def test_capture_and_calibration_targets_stay_out_of_gptq_hessians(tiny_model_dirs, monkeypatch):
    model_dir = tiny_model_dirs["llama"]
    plain = gptq_observed_tokens(monkeypatch, model_dir, [gptq()])
    calibration = CalibrationSettings(num_samples=8, epochs=1)
    with_intact = gptq_observed_tokens(monkeypatch, model_dir, [gptq(), IntactKVModifier(calibration=calibration)])
    assert plain and with_intact == plain


def test_rotated_recipe_stores_the_rotated_full_precision_kv(tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    unrotated = capture_prefix_kv(load(model_dir), [BOS])
    rotated_model = quantize(model_dir, [SpinQuantModifier(rotations=["R1", "R2"], transform_type="hadamard")])
    rotated = capture_prefix_kv(rotated_model, [BOS])

    model = quantize(
        model_dir,
        [IntactKVModifier(), SpinQuantModifier(rotations=["R1", "R2"], transform_type="hadamard"), gptq()],
    )
    stored = prefix_kv_of(model)

    assert_same_kv(stored, rotated)  # the same rotations of the same weights, the same forward of the prefix
    assert beyond(max_difference(stored.values, unrotated.values), 1e-2)  # R2 rotates the value heads


def _runnable_here(recipe: Path):
    """llm-compressor 0.14's AWQ pins its activation cache in page-locked memory, which needs CUDA."""
    needs_cuda = "AWQModifier" in recipe.read_text()
    marks = [pytest.mark.skipif(not torch.cuda.is_available(), reason="AWQ in llm-compressor 0.14 needs CUDA")]
    return pytest.param(recipe, id=recipe.stem, marks=marks if needs_cuda else [])


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_yaml_recipes_name_the_modifier(recipe):
    stages = Recipe.create_instance(str(recipe)).modifiers
    assert [type(m).__name__ for m in stages][-1] == "IntactKVModifier"


@pytest.mark.parametrize("recipe", [_runnable_here(p) for p in sorted(RECIPES.glob("*.yaml"))])
def test_shipped_yaml_recipes_run_and_store_full_precision_kv(tiny_model_dirs, tiny_chat_model_dir, recipe):
    """A chat recipe's prefix is the chat template's system turn: it runs on the tiny chat model (no BOS)."""
    chat = "prefix_chat_template" in recipe.read_text()
    model_dir = tiny_chat_model_dir if chat else tiny_model_dirs["llama"]
    model = quantize(model_dir, str(recipe))
    stored = prefix_kv_of(model)
    prefix = chat_system_part(load_tokenizer(model_dir))[1] if chat else [BOS]
    with intact_kv_disabled(model):
        quantized = model_kv_for_prefix(model, prefix)
    assert beyond(max_difference(stored.values, quantized.values), 1e-3)  # quantized weights move the K/V


def test_unknown_option_is_rejected():
    with pytest.raises(ValidationError, match="prefix_tokens"):
        IntactKVModifier(prefix_tokens=[1])


def test_prefix_longer_than_context_is_rejected(tiny_model_dirs):
    with pytest.raises(ValueError, match="must be shorter than the context"):
        quantize(tiny_model_dirs["llama"], [gptq(), IntactKVModifier(prefix_token_ids=[5] * 64)])


def test_model_without_bos_needs_an_explicit_prefix(tiny_model_dirs):
    with pytest.raises(ValueError, match="prefix_text"):
        quantize(tiny_model_dirs["qwen2"], [gptq(), IntactKVModifier(tokenizer=str(tiny_model_dirs["qwen2"]))])
