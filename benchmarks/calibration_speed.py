"""Wall time and peak memory of IntactKV+Cal for a ~1B-parameter Llama, at the paper's settings.

Timing only: the model has the shape of a 1.1B Llama (TinyLlama's: hidden 2048,
22 layers, 32 query / 4 KV heads) with seeded random weights, because no
pretrained model of that size loads offline here. The cost of calibration does
not depend on the weight values: it is 128 samples x 20 epochs of one forward
and one backward pass through the frozen model. Weights stay unquantized, so
the fake-quantization wrappers a quantized model runs through are not timed.
The samples are real text (the calibration split of the project corpus),
tokenized with the pivot-llama tokenizer, whose vocabulary sizes the model.

    python benchmarks/calibration_speed.py --out benchmarks/results/gpu

Writes ``calibration_speed.json`` and ``calibration_speed.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from intactkv_modifier import attach_intact_kv
from intactkv_modifier.calibration import CalibrationSettings, calibrate_prefix_kv, record_targets
from intactkv_modifier.capture import capture_prefix_kv
from intactkv_modifier.eval.corpus import load_corpus_text
from intactkv_modifier.eval.perplexity import token_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="models/pivot-llama")
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--intermediate-size", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="1 is the paper's setting")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    prefix = [tokenizer.bos_token_id]
    windows = token_windows(tokenizer, load_corpus_text("calibration"), prefix, args.length, args.samples)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    parameters = sum(p.numel() for p in model.parameters())

    attach_intact_kv(model, prefix, capture_prefix_kv(model, prefix))
    started = time.perf_counter()
    targets = record_targets(model, [{"input_ids": windows}], prefix, args.samples)
    record_seconds = time.perf_counter() - started

    cuda = args.device.startswith("cuda")
    runs = []
    for batch_size in args.batch_sizes:
        settings = CalibrationSettings(
            num_samples=args.samples, epochs=args.epochs, batch_size=batch_size, seed=args.seed
        )
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        calibrate_prefix_kv(model, targets, settings)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        steps = args.epochs * -(-args.samples // batch_size)
        runs.append({
            "batch_size": batch_size,
            "optimizer_steps": steps,
            "calibration_seconds": round(seconds, 1),
            "milliseconds_per_step": round(1000 * seconds / steps, 1),
            "calibration_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        })

    result = {
        "model": f"Llama shape, random weights (seed {args.seed}), {parameters / 1e9:.2f}B parameters",
        "config": {k: getattr(args, k) for k in ("hidden_size", "intermediate_size", "layers", "heads", "kv_heads")},
        "dtype": args.dtype,
        "samples": args.samples,
        "epochs": args.epochs,
        "sample_tokens": args.length,
        "lr": CalibrationSettings().lr,
        "record_targets_seconds": round(record_seconds, 1),
        "targets_mib": round(sum(t.numel() * t.element_size() for t in targets.hidden_states) / 2**20, 1),
        "runs": runs,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "CPU",
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (
        f"IntactKV+Cal on a {result['model']}, {args.dtype}, {args.samples} samples x {args.length} tokens, "
        f"{args.epochs} epochs, lr {result['lr']}, {result['device_name']}, torch {result['torch']}. "
        f"Recording the FP targets took {result['record_targets_seconds']} s; they take "
        f"{result['targets_mib']} MiB of CPU memory.\n\n"
        "| batch size | optimizer steps | calibration | per step | peak GPU memory |\n|---|---|---|---|---|\n"
    ) + "".join(
        f"| {run['batch_size']} | {run['optimizer_steps']} | {run['calibration_seconds']} s | "
        f"{run['milliseconds_per_step']} ms | {run['calibration_peak_gib']} GiB |\n"
        for run in runs
    )
    (args.out / "calibration_speed.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
