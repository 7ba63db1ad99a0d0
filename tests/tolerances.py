"""Tolerances of the tests, derived from the computation compared, never from a value measured on one machine.

Two results of the same arithmetic added up in another order (another kernel, blocking, batch shape or thread
count: ATen and MKL choose these per CPU) differ by rounding only. Each addition or product rounds to within
``u = eps / 2`` of its value; modelled as independent zero-mean errors (Higham & Mary, "A new approach to
probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019), the ``N`` roundings along a chain of
sums of lengths ``n_1, n_2, ...`` (``N = sum n_i``) stay within ``LAMBDA * u * sqrt(N)`` of the exact result with
probability above ``1 - 2 exp(-LAMBDA**2 / 2)``, so two orders differ by at most ``LAMBDA * eps * sqrt(N)``.
The bound is relative to the size of the values summed: :func:`scaled_error` divides by exactly that where a test
can compute it; elsewhere the bound is relative to the largest value compared (the tiny models normalise their
activations, so the values summed are of that size).

Quantized codes are no rounding: a value on a rounding boundary of its code moves by a whole code when its
input moves by one ulp. Tests comparing two paths through a quantized cache give both the same codes and check
that they could differ by at most that one code (``test_kv_packed.SharedCodes``); bounds on the quantization
error itself are in steps of the code (:func:`code_step`).

Set ``INTACTKV_TOLERANCE_LOG`` to a file to have every :func:`within` and :func:`beyond` check append the test,
the value and its bound to it (one JSON object per line): the margin each machine leaves.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import torch
from transformers import PretrainedConfig

from intactkv_modifier.architecture import kv_geometry, text_config

#: Higham & Mary's lambda: a bound of LAMBDA standard deviations fails with probability 2 exp(-32) < 1e-13
LAMBDA = 8.0
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def reordered(lengths: Sequence[int], dtype: torch.dtype = torch.float32) -> float:
    """Relative: how far two summation orders of chained sums of ``lengths`` can drift apart."""
    return LAMBDA * torch.finfo(dtype).eps * math.sqrt(sum(lengths))


def attention_layer_sums(config: PretrainedConfig, tokens: int) -> list[int]:
    """One attention layer's sums: q/k/v projections over the hidden size, QK-norms and scores over a head,
    softmax and value sum over ``tokens``, the output projection over all heads."""
    cfg, head_dim = text_config(config), kv_geometry(config).head_dim
    return [cfg.hidden_size] + [head_dim] * 3 + [tokens] * 2 + [cfg.num_attention_heads * head_dim]


def forward_sums(config: PretrainedConfig, tokens: int) -> list[int]:
    """The sums one decoder forward chains from the embeddings to a logit.

    Per layer: four norms over the hidden size (Gemma 3 has four, the others two), the attention layer, gate/up
    over the hidden size and down over the intermediate size; then the final norm and the output head.
    """
    cfg, layers = text_config(config), kv_geometry(config).num_layers
    hidden = cfg.hidden_size
    layer = [hidden] * 4 + attention_layer_sums(config, tokens) + [hidden, cfg.intermediate_size]
    return layer * layers + [hidden, hidden]


def packed_attention_sums(config: PretrainedConfig, tokens: int, layers: int | None = None) -> list[int]:
    """The sums over the past that the packed path adds in another order than dequantize-then-attend.

    Per layer: scores over a head and value sums over ``tokens``, each twice (the codes' sum, then the groups'
    offsets), and the softmax over ``tokens``; every other operation runs the same on the inputs these give.
    """
    head_dim = kv_geometry(config).head_dim
    return ([head_dim] * 2 + [tokens] * 3) * (kv_geometry(config).num_layers if layers is None else layers)


def two_forwards(config: PretrainedConfig, tokens: int) -> float:
    """Relative to the largest logit: two forwards of one model that may sum in other orders."""
    return reordered(forward_sums(config, tokens))


def two_perplexities(config: PretrainedConfig, tokens: int, largest_logit: float) -> float:
    """Relative: exp(mean NLL) moves by the NLL's shift, at most twice the largest logit error (log-softmax is
    2-Lipschitz in the max norm), when two forwards sum in other orders."""
    return 2 * two_forwards(config, tokens) * largest_logit


def two_mses(config: PretrainedConfig, tokens: int, largest_hidden: float, mse: float) -> float:
    """Relative: an MSE against fixed targets moves by at most ``2 sqrt(mse) d`` (Cauchy-Schwarz), where ``d``
    bounds how far two forwards' hidden states can drift apart."""
    return 2 * two_forwards(config, tokens) * largest_hidden / math.sqrt(mse)


def code_step(bits: int) -> float:
    """A quantized element's error relative to its group's largest magnitude, at most: half a step of
    ``2**bits - 1`` across a range of up to twice that magnitude."""
    return 1 / (2**bits - 1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest expected magnitude: the scale the bounds above refer to."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def scaled_error(actual: torch.Tensor, expected: torch.Tensor, summed: torch.Tensor) -> float:
    """Largest difference relative to the magnitudes each element summed (``|a| @ |b|`` for ``a @ b``)."""
    return float(((actual.double() - expected.double()).abs() / summed.double()).max())


def within(error: float, bound: float) -> bool:
    """``error <= bound``, noted in ``$INTACTKV_TOLERANCE_LOG`` when set."""
    _note("within", error, bound)
    return error <= bound


def beyond(difference: float, threshold: float) -> bool:
    """``difference > threshold``: an effect far from rounding, noted like :func:`within`."""
    _note("beyond", difference, threshold)
    return difference > threshold


def _note(kind: str, value: float, bound: float) -> None:
    log = os.environ.get("INTACTKV_TOLERANCE_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        record = dict(test=test, kind=kind, value=value, bound=bound,
                      capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads())
        with open(log, "a") as file:
            file.write(json.dumps(record) + "\n")
