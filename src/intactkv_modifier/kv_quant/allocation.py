"""Choosing key and value bits per layer from the K/V projection weights, under an average bit budget.

The criterion is "Quantize What Counts: More for Keys, Less for Values"
(Hariri et al., arXiv 2502.15075), Theorem 1 (Key-Value Norm Disparity): key
projections have larger norms than value projections, ``E[||W_K||_F] >
E[||W_V||_F]``, and Theorem 2: for the same total bits, giving the larger-norm
tensor more bits lowers the quantization error. The reason: a cached key or value
is ``W x`` (RoPE is a rotation and keeps norms), so for inputs of isotropic
covariance ``E||W x||^2`` is proportional to ``||W||_F^2``; the Frobenius norm
measures how large the cached vectors are, hence how wide the quantizer's range
and how large its error at a given width. The spectral norm (``||W x|| <=
||W||_2 ||x||``, the worst case) is offered as an alternative; both are reported.

The allocation minimises the rate-distortion estimate
``sum over layers of n_K^2 4^-b_K + n_V^2 4^-b_V`` (each extra bit halves a
uniform quantizer's step, quartering its squared error) subject to
``sum(b_K + b_V) <= budget * 2 * layers``, with widths from the allowed set. That
is a small multiple-choice knapsack, solved *exactly* by dynamic programming over
the integer number of bits used (the paper's reference code allocates greedily).
Swapping a layer's two widths shows the optimum gives its larger-norm tensor at
least as many bits, so keys get >= value bits wherever their norm is larger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict
from transformers import PreTrainedModel

from intactkv_modifier.architecture import attention_modules
from intactkv_modifier.kv_quant.settings import SUPPORTED_BITS, KVQuantSettings

__all__ = [
    "BitAllocation",
    "LayerAllocation",
    "NormKind",
    "ProjectionNorms",
    "allocate_bits",
    "choose_bits",
    "projection_norms",
]

NormKind = Literal["frobenius", "spectral"]


class ProjectionNorms(BaseModel):
    """Norms of one layer's key and value projection weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int
    key_frobenius: float
    value_frobenius: float
    key_spectral: float
    value_spectral: float


class LayerAllocation(ProjectionNorms):
    """One layer's projection norms and the bits chosen for its keys and values."""

    key_bits: int
    value_bits: int


class BitAllocation(BaseModel):
    """The allocator's report, and the settings that apply it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: float
    norm: NormKind
    allowed_bits: list[int]
    average_bits: float
    layers: list[LayerAllocation]
    settings: KVQuantSettings

    def markdown(self) -> str:
        lines = [
            f"Budget {self.budget:g} bits, {self.norm} norm, widths {self.allowed_bits}: "
            f"average {self.average_bits:.3f} bits.",
            "",
            "| layer | ‖W_K‖_F | ‖W_V‖_F | ‖W_K‖_2 | ‖W_V‖_2 | key bits | value bits |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {a.layer} | {a.key_frobenius:.3f} | {a.value_frobenius:.3f} | {a.key_spectral:.3f} | "
            f"{a.value_spectral:.3f} | {a.key_bits} | {a.value_bits} |"
            for a in self.layers
        ]
        return "\n".join(lines) + "\n"


@torch.no_grad()
def projection_norms(model: PreTrainedModel) -> list[ProjectionNorms]:
    """Frobenius and spectral norms of every layer's ``k_proj`` and ``v_proj`` weights."""
    attentions = attention_modules(model)
    norms = []
    for attention in attentions:
        key, value = (_projection_weight(attention, name) for name in ("k_proj", "v_proj"))
        norms.append(
            ProjectionNorms(
                layer=attention.layer_idx,
                key_frobenius=float(torch.linalg.matrix_norm(key)),
                value_frobenius=float(torch.linalg.matrix_norm(value)),
                key_spectral=float(torch.linalg.matrix_norm(key, ord=2)),
                value_spectral=float(torch.linalg.matrix_norm(value, ord=2)),
            )
        )
    if any(hasattr(attention, "k_norm") for attention in attentions):
        logger.warning(
            "KV bit allocation: this model normalises keys after k_proj (k_norm), so W_K's norm is not the keys' "
            "magnitude; the allocation follows the projection weights' norms as the paper does"
        )
    return norms


def choose_bits(
    key_norms: Sequence[float],
    value_norms: Sequence[float],
    budget: float,
    allowed_bits: Sequence[int] = SUPPORTED_BITS,
) -> list[tuple[int, int]]:
    """``(key_bits, value_bits)`` per layer minimising ``sum n^2 4^-b`` within ``budget`` average bits."""
    if len(key_norms) != len(value_norms) or not key_norms:
        raise ValueError(f"need one key and one value norm per layer, got {len(key_norms)} and {len(value_norms)}")
    allowed = sorted(set(allowed_bits))
    if not allowed or any(bits not in SUPPORTED_BITS for bits in allowed):
        raise ValueError(f"allowed_bits must be a non-empty subset of {list(SUPPORTED_BITS)}, got {list(allowed_bits)}")
    weights = [norm**2 for pair in zip(key_norms, value_norms) for norm in pair]
    total = math.floor(budget * len(weights) + 1e-9)
    if total < allowed[0] * len(weights):
        raise ValueError(
            f"a budget of {budget} bits is below the narrowest allowed width ({allowed[0]} bits); "
            f"raise the budget to at least {allowed[0]}"
        )
    # best[used]: lowest distortion of the tensors so far using exactly `used` bits;
    # back[i][used]: (bits used before tensor i, bits of tensor i) on that best path
    best: dict[int, float] = {0: 0.0}
    back: list[dict[int, tuple[int, int]]] = []
    for index, weight in enumerate(weights):
        room = total - allowed[0] * (len(weights) - index - 1)  # leave the narrowest width for every later tensor
        step: dict[int, float] = {}
        pointers: dict[int, tuple[int, int]] = {}
        for used, cost in best.items():
            for bits in allowed:
                reached = used + bits
                candidate = cost + weight * 4.0**-bits
                if reached <= room and candidate < step.get(reached, math.inf):
                    step[reached], pointers[reached] = candidate, (used, bits)
        best = step
        back.append(pointers)
    used = min(best, key=lambda reached: (best[reached], reached))
    chosen = []
    for pointers in reversed(back):
        used, bits = pointers[used]
        chosen.append(bits)
    chosen.reverse()
    return list(zip(chosen[0::2], chosen[1::2]))


def allocate_bits(
    model: PreTrainedModel,
    budget: float,
    base: KVQuantSettings | None = None,
    allowed_bits: Sequence[int] = SUPPORTED_BITS,
    norm: NormKind = "frobenius",
) -> BitAllocation:
    """Per-layer key/value bits for ``model`` within ``budget`` average bits, as settings plus a report.

    Run it on the full-precision weights: the norms describe the projections,
    not their rounding. ``base`` supplies grouping and the residual window.
    """
    norms = projection_norms(model)
    if norm == "frobenius":
        keys, values = [n.key_frobenius for n in norms], [n.value_frobenius for n in norms]
    else:
        keys, values = [n.key_spectral for n in norms], [n.value_spectral for n in norms]
    bits = choose_bits(keys, values, budget, allowed_bits)
    settings = (base or KVQuantSettings()).with_layer_bits(bits)
    layers = [LayerAllocation(**n.model_dump(), key_bits=k, value_bits=v) for n, (k, v) in zip(norms, bits)]
    allocation = BitAllocation(
        budget=budget,
        norm=norm,
        allowed_bits=sorted(set(allowed_bits)),
        average_bits=settings.average_bits(len(layers)),
        layers=layers,
        settings=settings,
    )
    logger.info(
        f"KV bit allocation ({norm} norm, budget {budget:g}): "
        + ", ".join(f"L{a.layer} K{a.key_bits}V{a.value_bits}" for a in layers)
    )
    return allocation


def _projection_weight(attention: torch.nn.Module, name: str) -> torch.Tensor:
    projection = getattr(attention, name, None)
    weight = getattr(projection, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.is_meta:
        raise TypeError(
            f"layer {attention.layer_idx} has no floating-point `{name}.weight` (fused or packed projections?); "
            "allocate bits on the full-precision model"
        )
    return weight.detach().float()
