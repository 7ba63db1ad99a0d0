"""Does a model have pivot tokens? Attention mass on the first token and activation outliers.

The IntactKV paper's diagnosis, on real text: per layer, the share of attention
that queries put on position 0 (the attention sink), and per position, the
largest hidden-state magnitude (pivot tokens carry outliers). IntactKV pays off
where the quantized model's error on those tokens reaches every later token, so
a model with neither signal gains little from it; the verdict says so up front.
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

__all__ = ["FIRST_QUERY", "PivotDiagnosis", "diagnose_pivot_tokens", "plot_diagnosis"]

FIRST_QUERY = 4  # skip the first queries, which can only attend to a few tokens anyway
#: A layer is a sink layer when its attention share on token 0 is this many times the uniform share.
SINK_FACTOR = 5.0
#: Token 0 is an activation outlier when its peak |hidden| is this many times the median of the others.
OUTLIER_FACTOR = 4.0


@dataclass(frozen=True)
class PivotDiagnosis:
    """The measurements of one model on ``windows`` windows of ``window_length`` tokens, token 0 the prefix."""

    model: str
    windows: int
    window_length: int
    attention_share_on_first_token_per_layer: list[float]
    attention_share_if_uniform: float
    max_abs_hidden_by_position: list[float]

    @property
    def first_token_peak(self) -> float:
        return self.max_abs_hidden_by_position[0]

    @property
    def other_tokens_median_peak(self) -> float:
        return statistics.median(self.max_abs_hidden_by_position[1:])

    @property
    def sink_layers(self) -> list[int]:
        threshold = SINK_FACTOR * self.attention_share_if_uniform
        return [i for i, share in enumerate(self.attention_share_on_first_token_per_layer) if share >= threshold]

    @property
    def outlier_ratio(self) -> float:
        return self.first_token_peak / max(self.other_tokens_median_peak, 1e-12)

    @property
    def has_pivot_tokens(self) -> bool:
        """Either signal suffices: a sink in some layer, or an activation outlier at token 0."""
        return bool(self.sink_layers) or self.outlier_ratio >= OUTLIER_FACTOR

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "max_abs_hidden_first_token": self.first_token_peak,
            "max_abs_hidden_other_tokens_median": self.other_tokens_median_peak,
            "sink_layers": self.sink_layers,
            "has_pivot_tokens": self.has_pivot_tokens,
            "machine": platform.platform(),
        }


@torch.no_grad()
def diagnose_pivot_tokens(
    model: PreTrainedModel, windows: torch.Tensor, name: str, positions: int = 32
) -> PivotDiagnosis:
    """Measure ``model`` (loaded with eager attention, so it can return attention maps) on ``windows``.

    Every window must start with the prefix under study; positions beyond
    ``positions`` are left out of the by-position peaks.
    """
    if windows.shape[1] <= FIRST_QUERY + 1:
        raise ValueError(f"windows of {windows.shape[1]} tokens are too short; use at least {FIRST_QUERY + 2}")
    output = model(input_ids=windows, output_attentions=True, output_hidden_states=True, use_cache=False)
    if not output.attentions or output.attentions[0] is None:
        raise ValueError(f"{name} returns no attention maps; load it with attn_implementation='eager'")
    length = windows.shape[1]
    sink_share = [float(a[:, :, FIRST_QUERY:, 0].float().mean()) for a in output.attentions]
    uniform_share = float((1.0 / torch.arange(FIRST_QUERY + 1, length + 1, dtype=torch.float64)).mean())
    hidden = torch.stack(output.hidden_states[1:]).float()  # [layers, windows, tokens, hidden]
    peak_by_position = hidden.abs().amax(dim=(0, 3)).mean(dim=0)[:positions]
    return PivotDiagnosis(
        model=name,
        windows=windows.shape[0],
        window_length=length,
        attention_share_on_first_token_per_layer=sink_share,
        attention_share_if_uniform=uniform_share,
        max_abs_hidden_by_position=peak_by_position.tolist(),
    )


def plot_diagnosis(diagnosis: PivotDiagnosis, path: Path) -> None:
    """Attention share per layer beside the activation peaks by position, as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    shares = diagnosis.attention_share_on_first_token_per_layer
    left.bar(range(len(shares)), shares, color="tab:blue", label="measured")
    left.axhline(diagnosis.attention_share_if_uniform, color="gray", linestyle="--", label="uniform attention")
    left.set(xlabel="layer", ylabel="attention share on token 0", title="Attention sink on token 0", ylim=(0, 1))
    left.legend()
    peaks = diagnosis.max_abs_hidden_by_position
    right.bar(range(len(peaks)), peaks, color=["tab:red"] + ["tab:gray"] * (len(peaks) - 1))
    right.set(xlabel="token position", ylabel="max |hidden state|", title="Activation outliers by position")
    figure.suptitle(Path(diagnosis.model).name)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
