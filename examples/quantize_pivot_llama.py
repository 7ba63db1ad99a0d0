"""Fast example: quantize pivot-llama with GPTQ + IntactKV, save, reload, compare perplexity.

Runs offline on CPU in a few minutes (the main job, `scripts/main.sh`, does the same for
Gemma 3 270M through the `intactkv` command). The model is `models/pivot-llama` (trained by
this project, see its model card) and the text is the project's real-English
corpus (`intactkv_modifier.eval.corpus`); calibration and evaluation text never
overlap. Prints FP / quantized / quantized+IntactKV perplexity of the *reloaded*
compressed-tensors checkpoint and writes the table to ``<out>/quality.md``.

    python examples/quantize_pivot_llama.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from intactkv_modifier.eval.corpus import load_corpus_text
from intactkv_modifier.eval.perplexity import token_windows
from intactkv_modifier.eval.report import evaluate_checkpoint
from intactkv_modifier.export import quantize_to_checkpoint
from intactkv_modifier.recipes import resolve_recipe
from intactkv_modifier.serving.checkpoint import read_config_block

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "pivot-llama")
    parser.add_argument("--recipe", default="gptq-w3a16", help="shipped recipe name or YAML path")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "pivot-llama-gptq-intactkv")
    parser.add_argument("--calibration-windows", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prefix = [tokenizer.bos_token_id]
    calib = token_windows(tokenizer, load_corpus_text("calibration"), prefix, args.length, args.calibration_windows)
    evaluation = token_windows(tokenizer, load_corpus_text("eval"), prefix, args.length, args.eval_windows)

    quantize_to_checkpoint(args.model, resolve_recipe(args.recipe), args.out, calib, dtype=torch.float32)
    quality = evaluate_checkpoint(args.out, evaluation, reference=args.model)
    table = quality.markdown(
        f"Model {args.model.name}, recipe {args.recipe}, {args.eval_windows} held-out windows of "
        f"{args.length} tokens, {args.calibration_windows} calibration windows, seed {args.seed}, CPU; "
        "quantized rows from the reloaded checkpoint."
    )
    (args.out / "quality.md").write_text(table + "\n")
    print(table)
    print(f"\ncheckpoint: {args.out}")
    print(f"config block: {json.dumps(read_config_block(args.out).to_config_value())}")


if __name__ == "__main__":
    main()
