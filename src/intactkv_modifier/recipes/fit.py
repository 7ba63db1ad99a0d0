"""Reading a recipe before oneshot: its IntactKV prefix, and whether its weight groups fit the model.

Both are needed before any work starts. The calibration and evaluation windows must
start with the prefix the recipe's ``IntactKVModifier`` will store, which depends on
the model's tokenizer; and a group size that does not divide a layer's input width
stops llm-compressor at initialize with one line per layer (210 lines for SmolLM2's
576-wide layers and group 128), where the user needs one line saying which group
sizes fit and which shipped recipe uses one. Imports llm-compressor: not for the
serving environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationStrategy
from compressed_tensors.utils import match_named_modules
from llmcompressor.modifiers import Modifier
from llmcompressor.recipe import Recipe

from intactkv_modifier.modifier import IntactKVModifier
from intactkv_modifier.recipes import shipped_recipes

__all__ = ["WeightGroups", "check_group_sizes", "intactkv_modifier_in", "shape_only_model", "weight_groups"]

_GROUPED = (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP)
#: Group sizes worth suggesting, largest (fewest scales) first.
_COMMON_GROUP_SIZES = (256, 128, 64, 32)


@dataclass(frozen=True)
class WeightGroups:
    """One quantization scheme of a recipe that quantizes weights in groups along the input dimension."""

    bits: int
    group_size: int
    targets: tuple[str, ...]
    ignore: tuple[str, ...]


def recipe_modifiers(recipe: Path) -> list[Modifier]:
    return list(Recipe.create_instance(str(recipe)).modifiers)


def intactkv_modifier_in(recipe: Path) -> IntactKVModifier:
    """The recipe's ``IntactKVModifier`` (validated, not initialized)."""
    found = [modifier for modifier in recipe_modifiers(recipe) if isinstance(modifier, IntactKVModifier)]
    if not found:
        raise ValueError(f"recipe {recipe} has no IntactKVModifier; add `IntactKVModifier: {{}}` to its modifiers")
    return found[0]


def weight_groups(recipe: Path) -> list[WeightGroups]:
    """The group-quantized weight schemes of every quantization modifier in ``recipe``."""
    groups = []
    for modifier in recipe_modifiers(recipe):
        if not hasattr(modifier, "resolve_quantization_config"):
            continue
        for scheme in (modifier.resolve_quantization_config().config_groups or {}).values():
            weights = scheme.weights
            if weights is not None and weights.group_size and weights.strategy in _GROUPED:
                groups.append(WeightGroups(weights.num_bits, weights.group_size, tuple(scheme.targets),
                                           tuple(modifier.ignore or ())))
    return groups


def check_group_sizes(model: torch.nn.Module, recipe: Path, recipe_name: str | None = None) -> None:
    """Raise one line when a group size of ``recipe`` does not divide the input width of a layer it quantizes,
    naming the widths, the group sizes that fit every targeted layer, and the shipped recipes that use one."""
    for groups in weight_groups(recipe):
        widths = _input_widths(model, groups)
        misfits = sorted({width for width in widths.values() if width >= groups.group_size
                          and width % groups.group_size})
        if not misfits:
            continue
        layers = sum(1 for width in widths.values() if width in misfits)
        fitting = [size for size in _COMMON_GROUP_SIZES if all(width % size == 0 for width in widths.values())]
        shipped = _shipped_recipes_that_fit(widths, groups.bits)
        raise ValueError(
            f"recipe {recipe_name or recipe} quantizes weights in groups of {groups.group_size}, which does not "
            f"divide the input width {' or '.join(map(str, misfits))} of {layers} of the {len(widths)} layers it "
            f"targets; group sizes that fit every layer: {', '.join(map(str, fitting)) or 'none of 256/128/64/32'}. "
            + (f"Use the shipped recipe {' or '.join(shipped)}, or set `group_size: {fitting[0]}` in yours."
               if shipped else f"Set `group_size: {fitting[0]}` in the recipe." if fitting else "")
        )


def shape_only_model(model_source: str) -> torch.nn.Module:
    """The model's modules with their shapes and no weights (meta device): enough to check a recipe against it
    before anything is loaded or calibrated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_source))


def _input_widths(model: torch.nn.Module, groups: WeightGroups) -> dict[str, int]:
    return {
        name: int(module.weight.shape[-1])
        for name, module in match_named_modules(model, list(groups.targets), list(groups.ignore))
        if hasattr(module, "weight")
    }


def _shipped_recipes_that_fit(widths: dict[str, int], bits: int) -> list[str]:
    """Shipped recipes with weights of ``bits`` bits whose every group size divides every width."""
    names = []
    for name, path in shipped_recipes().items():
        groups = weight_groups(path)
        if groups and any(g.bits == bits for g in groups) and all(
            width % g.group_size == 0 for g in groups for width in widths.values()
        ):
            names.append(name)
    return names
