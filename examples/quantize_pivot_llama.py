"""Main job: quantize a real small Llama with GPTQ + IntactKV, save, reload, compare perplexity.

Runs offline on CPU in a few minutes. The model is `models/pivot-llama` (trained by
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
from datasets import Dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer

import intactkv_modifier  # noqa: F401  (registers IntactKVModifier for YAML, and the loading hook)
from intactkv_modifier import config_of, intact_kv_disabled
from intactkv_modifier.eval.corpus import load_corpus_text
from intactkv_modifier.eval.perplexity import perplexity, token_windows

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "pivot-llama")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "gptq_w3a16_intactkv.yaml")
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

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ppl_fp = perplexity(model, evaluation, desc="FP")

    oneshot(
        model=model,
        processor=tokenizer,
        dataset=Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}),
        recipe=str(args.recipe),
        num_calibration_samples=args.calibration_windows,
        max_seq_length=args.length,
    )
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    del model

    reloaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    with intact_kv_disabled(reloaded):
        ppl_quantized = perplexity(reloaded, evaluation, desc="quantized")
    ppl_intact = perplexity(reloaded, evaluation, desc="quantized+IntactKV")

    gap = ppl_quantized - ppl_fp
    closed = f"{(ppl_quantized - ppl_intact) / gap:.1%}" if gap > 0 else "n/a"
    table = "\n".join(
        [
            f"Model {args.model.name}, recipe {args.recipe.name}, {args.eval_windows} held-out windows of "
            f"{args.length} tokens, {args.calibration_windows} calibration windows, seed {args.seed}, CPU.",
            "",
            "| model | perplexity |",
            "|---|---|",
            f"| FP (float32) | {ppl_fp:.3f} |",
            f"| quantized (reloaded checkpoint, IntactKV off) | {ppl_quantized:.3f} |",
            f"| quantized + IntactKV (reloaded checkpoint) | {ppl_intact:.3f} |",
            "",
            f"IntactKV closes {closed} of the FP→quantized perplexity gap.",
        ]
    )
    (args.out / "quality.md").write_text(table + "\n")
    print(table)
    print(f"\ncheckpoint: {args.out}")
    print(f"config block: {json.dumps(config_of(reloaded).to_config_value())}")


if __name__ == "__main__":
    main()
