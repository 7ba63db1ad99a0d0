"""How each command's result reads in a terminal: short tables and one verdict line."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:  # the views draw results; computing them imports torch and llm-compressor
    from intactkv_modifier.eval.diagnosis import PivotDiagnosis
    from intactkv_modifier.eval.report import ChatCheckpointQuality, CheckpointQuality
    from intactkv_modifier.export import QuantizedCheckpoint
    from intactkv_modifier.inspection import CheckpointInspection

__all__ = ["chat_quality_view", "diagnosis_view", "inspection_view", "quality_view", "quantized_view"]

_POSITIONS_SHOWN = 4
_MARK = {"ok": "[green]✓[/]", "warning": "[yellow]![/]", "error": "[red]✗[/]"}


def diagnosis_view(diagnosis: PivotDiagnosis, prefix_text: str, prefix_ids: list[int]) -> list[object]:
    uniform = diagnosis.attention_share_if_uniform
    layers = Table(title=f"Attention share on token 0 (uniform attention: {uniform:.3f})", title_justify="left")
    layers.add_column("layer", justify="right")
    layers.add_column("share", justify="right")
    layers.add_column("× uniform", justify="right")
    layers.add_column("sink")
    for layer, share in enumerate(diagnosis.attention_share_on_first_token_per_layer):
        layers.add_row(str(layer), f"{share:.3f}", f"{share / uniform:.1f}", "yes" if layer in diagnosis.sink_layers
                       else "")
    peaks = Table(title="Largest |hidden state| by position (mean over windows)", title_justify="left")
    peaks.add_column("position", justify="right")
    peaks.add_column("max |h|", justify="right")
    for position, peak in enumerate(diagnosis.max_abs_hidden_by_position[:_POSITIONS_SHOWN]):
        peaks.add_row(str(position), f"{peak:.1f}")
    peaks.add_row(f"median of 1..{len(diagnosis.max_abs_hidden_by_position) - 1}",
                  f"{diagnosis.other_tokens_median_peak:.1f}")
    return [layers, peaks, _diagnosis_verdict(diagnosis, prefix_text, prefix_ids)]


def _diagnosis_verdict(diagnosis: PivotDiagnosis, prefix_text: str, prefix_ids: list[int]) -> str:
    signals = []
    if diagnosis.sink_layers:
        signals.append(f"attention sink in layer(s) {', '.join(map(str, diagnosis.sink_layers))}")
    signals.append(f"token 0's activation peak is {diagnosis.outlier_ratio:.1f}× the other positions' median")
    if not prefix_ids:
        keep = ("this tokenizer adds no BOS and has no chat template with a system turn, so set `prefix_text` to the "
                "text every prompt starts with (`intactkv diagnose --prefix-text ...` measures it)")
    elif len(prefix_ids) == 1:
        keep = f"keep {prefix_text!r} (id {prefix_ids[0]}) intact: `IntactKVModifier: {{}}` in the shipped recipes"
    else:
        keep = (f"keep the whole {len(prefix_ids)}-token prefix intact: `IntactKVModifier: {{prefix_chat_template: "
                "true}` for a chat template's system turn (shipped: gptq-w3a16-g64-chat), else `{prefix_text: ...}`")
    if diagnosis.has_pivot_tokens:
        return f"[bold]Pivot tokens: yes[/] ({'; '.join(signals)}). {escape(keep[0].upper() + keep[1:])}."
    return (f"[bold]Pivot tokens: no clear sign[/] ({'; '.join(signals)}); IntactKV is unlikely to help much on "
            "this model.")


def quantized_view(result: QuantizedCheckpoint, recipe_name: str) -> list[object]:
    table = Table(show_header=False, title=escape(f"Saved {result.path} ({recipe_name}, {result.seconds:.0f} s)"),
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("prefix", escape(f"{result.prefix_text!r} (ids {result.prefix_token_ids})"))
    table.add_row("error replaced", f"keys {result.key_error_replaced:.2%}, values {result.value_error_replaced:.2%} "
                  "(quantized model's own prefix KV vs the stored one, mean relative error)")
    cal = result.calibration
    table.add_row("calibration MSE", "not calibrated (the recipe sets no `calibration:`)" if cal is None
                  else f"{cal['mse_before']:.4g} → {cal['mse_after']:.4g}")
    source = "" if result.source_weight_bytes is None else f"{_size(result.source_weight_bytes)} → "
    table.add_row("weights", f"{source}{_size(result.weight_bytes)}")
    table.add_row("side file", f"intactkv/prefix_kv.safetensors, {_size(result.sidecar_bytes)}")
    return [table]


def quality_view(quality: CheckpointQuality, source: str) -> list[object]:
    table = Table(title=f"Perplexity, {quality.windows} windows of {quality.window_length} tokens ({source})",
                  title_justify="left")
    table.add_column("model")
    table.add_column("perplexity", justify="right")
    for name, value in quality.rows():
        table.add_row(name, f"{value:.3f}")
    lines: list[object] = [table]
    if quality.gap_closed is not None:
        lines.append(f"IntactKV closes {quality.gap_closed:.1%} of the FP→quantized perplexity gap.")
    elif quality.fp is None:
        lines.append("Give --reference MODEL (the full-precision model) for the FP row and the gap closed.")
    return lines


def chat_quality_view(quality: ChatCheckpointQuality) -> list[object]:
    sizes = quality.eval_set
    table = Table(
        title=f"Chat evaluation, held-out conversations after the {quality.prefix_length}-token intact prefix: "
        f"{sizes['single_turn_samples']} single-turn ({sizes['single_turn_scored_tokens']} answer tokens), "
        f"{sizes['multi_turn_samples']} multi-turn ({sizes['multi_turn_scored_tokens']}), "
        f"{sizes['greedy_samples']} FP greedy answers ({sizes['greedy_scored_tokens']} positions)",
        title_justify="left",
    )
    for column in ("model", "ppl", "multi-turn ppl", "KL", "top-1"):
        table.add_column(column, justify="left" if column == "model" else "right")
    rows = [("FP (reference)", quality.fp)] if quality.fp is not None else []
    rows += [("quantized (IntactKV off)", quality.quantized), ("quantized + IntactKV", quality.intactkv)]
    for name, scores in rows:
        is_fp = scores is quality.fp
        agreement = ("", "") if is_fp else (_optional(scores.kl_to_fp, 4), _optional(scores.top1_agreement, 4))
        table.add_row(name, f"{scores.single_turn_ppl:.3f}", _optional(scores.multi_turn_ppl, 3), *agreement)
    lines: list[object] = [
        table,
        "ppl: perplexity of the assistant's answer tokens and its end-of-turn token only; KL: KL(FP ‖ model) per "
        "position, top-1: agreement with the FP model's most likely token, along the FP model's greedy answers.",
    ]
    if quality.gap_closed is not None:
        lines.append(f"IntactKV closes {quality.gap_closed:.1%} of the FP→quantized assistant-perplexity gap.")
    elif quality.fp is None:
        lines.append("Give --reference MODEL (the full-precision model) for the FP row, the KL and the gap closed.")
    return lines


def _optional(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def inspection_view(report: CheckpointInspection, full: bool) -> list[object]:
    """The block, the side file's tensors and every check; only the verdict when not ``full`` (``-q``)."""
    colour = "green" if report.loads else "red"
    verdict = f"[bold {colour}]Verdict: {escape(report.verdict)}[/]"
    if not full:
        return [verdict]
    lines: list[object] = []
    if report.block is not None:
        lines.append(f"[bold]intactkv_config[/] in {escape(str(report.path / 'config.json'))}:")
        lines.append(escape(json.dumps(report.block, indent=2)))
    if report.tensors:
        tensors = Table(title="Side file tensors, per layer (layers.{i}.self_attn.*)", title_justify="left")
        for column in ("layer", "intact_key", "intact_value"):
            tensors.add_column(column)
        for layer in range(len(report.tensors) // 2):
            cells = [report.tensors[f"layers.{layer}.self_attn.{kind}"] for kind in ("intact_key", "intact_value")]
            tensors.add_row(str(layer), *(f"{list(shape)} {dtype}" for shape, dtype in cells))
        lines.append(tensors)
    checks = Table(title="Loader checks", title_justify="left", show_header=False)
    checks.add_column()
    checks.add_column(style="bold")
    checks.add_column()
    for check in report.checks:
        checks.add_row(_MARK[check.outcome], check.name, escape(check.detail))
    lines.append(checks)
    lines.append(verdict)
    return lines


def _size(size: float) -> str:
    units = ("B", "kB", "MB", "GB")
    unit = 0
    while size >= 1000 and unit < len(units) - 1:
        size /= 1000
        unit += 1
    return f"{size:.0f} B" if unit == 0 else f"{size:.1f} {units[unit]}"
