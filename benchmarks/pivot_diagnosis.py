"""Does a model have pivot tokens? Attention mass on the first token and activation outliers.

Reproduces the IntactKV paper's diagnosis on real text: per layer, the share of
attention that queries put on position 0 (the [BOS] attention sink), and per
position, the largest hidden-state magnitude (pivot tokens carry outliers).
Writes ``pivot_diagnosis.json`` and ``pivot_diagnosis.png`` into ``--out``.

    python benchmarks/pivot_diagnosis.py --model models/pivot-llama --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from intactkv_modifier.eval.corpus import load_corpus_text
from intactkv_modifier.eval.perplexity import token_windows

FIRST_QUERY = 4  # skip the first queries, which can only attend to a few tokens anyway


@torch.no_grad()
def diagnose(model_dir: str, windows: int, length: int, positions: int) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    ids = token_windows(tokenizer, load_corpus_text("eval"), [tokenizer.bos_token_id], length, windows)
    output = model(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=False)

    sink_share = [float(a[:, :, FIRST_QUERY:, 0].mean()) for a in output.attentions]
    uniform_share = float((1.0 / torch.arange(FIRST_QUERY + 1, length + 1, dtype=torch.float64)).mean())
    hidden = torch.stack(output.hidden_states[1:])  # [layers, windows, tokens, hidden]
    peak_by_position = hidden.abs().amax(dim=(0, 3)).mean(dim=0)[:positions]
    return {
        "model": model_dir,
        "data": "eval split of intactkv_modifier.eval.corpus",
        "windows": windows,
        "window_length": length,
        "attention_share_on_first_token_per_layer": sink_share,
        "attention_share_if_uniform": uniform_share,
        "max_abs_hidden_by_position": peak_by_position.tolist(),
        "max_abs_hidden_first_token": float(peak_by_position[0]),
        "max_abs_hidden_other_tokens_median": float(peak_by_position[1:].median()),
        "machine": platform.platform(),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    shares = result["attention_share_on_first_token_per_layer"]
    left.bar(range(len(shares)), shares, color="tab:blue", label="measured")
    left.axhline(result["attention_share_if_uniform"], color="gray", linestyle="--", label="uniform attention")
    left.set(xlabel="layer", ylabel="attention share on token 0", title="Attention sink on [BOS]", ylim=(0, 1))
    left.legend()
    peaks = result["max_abs_hidden_by_position"]
    right.bar(range(len(peaks)), peaks, color=["tab:red"] + ["tab:gray"] * (len(peaks) - 1))
    right.set(xlabel="token position", ylabel="max |hidden state|", title="Activation outliers by position")
    figure.suptitle(Path(result["model"]).name)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/pivot-llama")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--positions", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = diagnose(args.model, args.windows, args.length, args.positions)
    (args.out / "pivot_diagnosis.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "pivot_diagnosis.png")
    shares = ", ".join(f"{s:.2f}" for s in result["attention_share_on_first_token_per_layer"])
    print(f"attention share on token 0 per layer: {shares} (uniform: {result['attention_share_if_uniform']:.3f})")
    print(
        f"max |hidden|: first token {result['max_abs_hidden_first_token']:.1f}, "
        f"median of others {result['max_abs_hidden_other_tokens_median']:.1f}"
    )


if __name__ == "__main__":
    main()
