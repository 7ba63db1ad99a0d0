"""Cut the calibration and evaluation windows a GPU session uses (it has no corpus) into one file.

    python benchmarks/offline_vllm/gpu_session/make_windows.py outputs/gemma-3-270m .carry/gpu-run/gemma_windows.pt
    python benchmarks/offline_vllm/gpu_session/make_windows.py outputs/smollm2-135m-instruct \
        .carry/gpu-run/smollm2_windows.pt --prefix-text "$(cat prompt.txt)" --eval-windows 16

The windows are the ones the CPU tables use (``eval.perplexity.token_windows`` over the corpus's calibration and
eval splits), so GPU and CPU rows see the same tokens.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from intactkv_modifier.eval.corpus import load_corpus_text
from intactkv_modifier.eval.perplexity import token_windows

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", type=Path, help="a prepared model folder (its tokenizer)")
parser.add_argument("out", type=Path)
parser.add_argument("--prefix-text", help="the intact prefix's text (default: the tokenizer's BOS token alone)")
parser.add_argument("--calibration-windows", type=int, default=32)
parser.add_argument("--calibration-length", type=int, default=256)
parser.add_argument("--eval-windows", type=int, default=8)
parser.add_argument("--eval-length", type=int, default=512)
args = parser.parse_args()
tokenizer = AutoTokenizer.from_pretrained(args.model)
prefix = [tokenizer.bos_token_id] if args.prefix_text is None else tokenizer(args.prefix_text)["input_ids"]
windows = {
    "calibration": token_windows(
        tokenizer, load_corpus_text("calibration"), prefix, args.calibration_length, args.calibration_windows
    ),
    "eval": token_windows(tokenizer, load_corpus_text("eval"), prefix, args.eval_length, args.eval_windows),
}
torch.save(windows, args.out)
print({split: tuple(tensor.shape) for split, tensor in windows.items()})
