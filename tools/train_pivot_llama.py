"""Train `models/pivot-llama`: a small real Llama on real English, so IntactKV can be measured offline.

No package ships decoder-only LM weights and no machine here reaches the model hub,
so the project trains its own. Two steps, so the GPU machine (no network, no
Debian packages) needs only torch and transformers:

    # CPU, where `apt-get install dict-gcide` works: train the tokenizer, tokenize the splits
    python tools/train_pivot_llama.py prepare --data .carry/pivot-llama-data
    # GPU: train, keep the checkpoint with the best held-out loss, write it in <16 MiB shards
    python tools/train_pivot_llama.py train --data .carry/pivot-llama-data --out $OUT/pivot-llama --minutes 7

Every training window starts with [BOS], as every prompt does, which is what
makes the first token an attention sink.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2


def prepare(data: Path, vocab_size: int) -> None:
    from intactkv_modifier.eval.corpus import load_corpus_text

    data.mkdir(parents=True, exist_ok=True)
    train_text = load_corpus_text("train")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(train_text.split("\n\n"), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    wrapped.save_pretrained(data / "tokenizer")
    separator = wrapped("\n\n", add_special_tokens=False)["input_ids"]
    for split in ("train", "calibration"):
        # the same stream the evaluation windows are cut from: documents joined by blank lines, no EOS,
        # so [BOS] at the start of every window is the only special token the model ever sees
        documents = load_corpus_text(split).split("\n\n")
        ids = [token for doc in wrapped(documents, add_special_tokens=False)["input_ids"] for token in doc + separator]
        np.save(data / f"{split}.npy", np.asarray(ids, dtype=np.uint16))
        print(f"{split}: {len(ids)} tokens")


def build_model(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config)


def windows(tokens: torch.Tensor, length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Random windows of ``length - 1`` corpus tokens, each behind a [BOS]."""
    starts = torch.randint(0, tokens.numel() - length, (count,), generator=generator)
    body = torch.stack([tokens[s : s + length - 1] for s in starts.tolist()])
    return torch.cat([torch.full((count, 1), BOS, dtype=body.dtype), body], dim=1)


@torch.no_grad()
def held_out_loss(model: LlamaForCausalLM, batches: torch.Tensor, device: str) -> float:
    model.eval()
    losses = []
    for batch in batches:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            losses.append(float(model(input_ids=batch.to(device), labels=batch.to(device)).loss))
    model.train()
    return sum(losses) / len(losses)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.data / "tokenizer")
    train_tokens = torch.from_numpy(np.load(args.data / "train.npy").astype(np.int64))
    eval_tokens = torch.from_numpy(np.load(args.data / "calibration.npy").astype(np.int64))  # eval split stays unseen
    generator = torch.Generator().manual_seed(args.seed)
    eval_batches = windows(eval_tokens, args.length, 8 * args.eval_batches, generator).view(args.eval_batches, 8, -1)

    model = build_model(len(tokenizer)).to(device)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M on {device}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    started, step, log, best = time.time(), 0, [], math.inf
    args.out.mkdir(parents=True, exist_ok=True)
    while (elapsed := time.time() - started) < budget:
        progress = elapsed / budget
        warmup = min(1.0, step / args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        batch = windows(train_tokens, args.length, args.batch, generator).to(device, non_blocking=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % args.eval_every == 0:
            val = held_out_loss(model, eval_batches, device)
            entry = {"step": step, "tokens": step * args.batch * args.length, "seconds": round(elapsed, 1),
                     "train_loss": float(loss), "eval_loss": val, "eval_ppl": math.exp(val)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            if val < best:
                best = val
                bf16 = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
                bf16.pop("lm_head.weight")  # tied to the input embeddings; storing it twice costs 6 MB
                model.save_pretrained(args.out, state_dict=bf16, max_shard_size="15MB")
                tokenizer.save_pretrained(args.out)
    summary = {"steps": step, "tokens": step * args.batch * args.length, "seconds": round(time.time() - started, 1),
               "best_eval_loss": best, "best_eval_ppl": math.exp(best), "device": torch.cuda.get_device_name()
               if device == "cuda" else "cpu", "args": {k: str(v) for k, v in vars(args).items()}, "log": log}
    (args.out / "training_log.json").write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare")
    prep.add_argument("--data", type=Path, default=Path(".carry/pivot-llama-data"))
    prep.add_argument("--vocab-size", type=int, default=8192)
    run = sub.add_parser("train")
    run.add_argument("--data", type=Path, default=Path(".carry/pivot-llama-data"))
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--minutes", type=float, default=7.0)
    run.add_argument("--length", type=int, default=512)
    run.add_argument("--batch", type=int, default=128)
    run.add_argument("--lr", type=float, default=3e-3)
    run.add_argument("--warmup", type=int, default=200)
    run.add_argument("--eval-every", type=int, default=250)
    run.add_argument("--eval-batches", type=int, default=16)
    run.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.data, args.vocab_size)
    else:
        train(args)


if __name__ == "__main__":
    main()
