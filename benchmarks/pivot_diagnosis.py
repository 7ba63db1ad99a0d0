"""Does a model have pivot tokens? Attention mass on the first token and activation outliers.

The measurement is :mod:`intactkv_modifier.eval.diagnosis` (also behind
``intactkv diagnose``), on the held-out split of the project's corpus.
Writes ``pivot_diagnosis.json`` and ``pivot_diagnosis.png`` into ``--out``.

    python benchmarks/pivot_diagnosis.py --model models/pivot-llama --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from intactkv_modifier.eval.corpus import load_corpus_text
from intactkv_modifier.eval.diagnosis import diagnose_pivot_tokens, plot_diagnosis
from intactkv_modifier.eval.perplexity import token_windows
from intactkv_modifier.prefix import measured_prefix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/pivot-llama")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--positions", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager", dtype=torch.float32).eval()
    prefix = measured_prefix(tokenizer)[0]  # [BOS], or a chat model's system turn
    windows = token_windows(tokenizer, load_corpus_text("eval"), prefix, args.length, args.windows)
    result = diagnose_pivot_tokens(model, windows, args.model, args.positions)
    report = {**result.to_json(), "data": "eval split of intactkv_modifier.eval.corpus"}
    (args.out / "pivot_diagnosis.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_diagnosis(result, args.out / "pivot_diagnosis.png")
    shares = ", ".join(f"{s:.2f}" for s in result.attention_share_on_first_token_per_layer)
    print(f"attention share on token 0 per layer: {shares} (uniform: {result.attention_share_if_uniform:.3f})")
    print(
        f"max |hidden|: first token {result.first_token_peak:.1f}, "
        f"median of others {result.other_tokens_median_peak:.1f}"
    )


if __name__ == "__main__":
    main()
