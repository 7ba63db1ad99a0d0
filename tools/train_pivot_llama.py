"""Train `models/pivot-llama`: a small real Llama on real English, so IntactKV can be measured offline.

No package ships decoder-only LM weights and no machine here reaches the model hub,
so the project trains its own. Two steps, so the GPU machine (no network, no
Debian packages) needs only torch and transformers:

    # CPU, where `apt-get install dict-gcide` works: train the tokenizer, tokenize the splits
    python tools/train_pivot_llama.py prepare --data .carry/pivot-llama-data
    # GPU: train, keep the checkpoint with the best held-out loss, write it in <16 MiB shards
    python tools/train_pivot_llama.py train --data .carry/pivot-llama-data --out $OUT/pivot-llama --minutes 3.5

Every training window starts with [BOS], as every prompt does, which is what
makes the first token an attention sink. The corpus is small (11 M tokens) for
the number of tokens one GPU reads in minutes: without regularisation the model
over-fitted after ~9 epochs (best held-out loss at ~100 s of a 7-minute run).
Residual dropout (GPT-2 style, on each attention and MLP output, training only)
lets it use the whole budget, with a lower held-out loss. Each evaluation also
logs the sink (the share of attention that queries at positions >= 4 put on
position 0, per layer), so the log shows how it forms.
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


def build_model(vocab_size: int, args: argparse.Namespace) -> LlamaForCausalLM:
    """A plain Llama: GPTQ's group size 128 needs hidden and MLP sizes that are multiples of 128."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64 // args.gqa,
        head_dim=64,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config)


def add_residual_dropout(model: LlamaForCausalLM, p: float) -> None:
    """Dropout on every attention and MLP output in training mode; hooks only, so the checkpoint stays a plain Llama."""

    def attention_hook(module: torch.nn.Module, _inputs: tuple, output: tuple) -> tuple:
        return (torch.nn.functional.dropout(output[0], p, module.training), *output[1:])

    def mlp_hook(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(output, p, module.training)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(attention_hook)
        layer.mlp.register_forward_hook(mlp_hook)


def windows(tokens: torch.Tensor, length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Random windows of ``length - 1`` corpus tokens, each behind a [BOS] (on the device ``tokens`` is on)."""
    starts = torch.randint(0, tokens.numel() - length, (count, 1), generator=generator).to(tokens.device)
    body = tokens[starts + torch.arange(length - 1, device=tokens.device)]
    return torch.cat([torch.full((count, 1), BOS, dtype=body.dtype, device=body.device), body], dim=1)


@torch.no_grad()
def held_out_loss(model: LlamaForCausalLM, batches: torch.Tensor, device: str) -> float:
    model.eval()
    losses = []
    for batch in batches:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            losses.append(float(model(input_ids=batch.to(device), labels=batch.to(device)).loss))
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def sink_share(model: LlamaForCausalLM, batch: torch.Tensor) -> list[float]:
    """Per layer, the mean share of attention that queries at positions >= 4 put on position 0 (float32, eager)."""
    model.eval()
    model.set_attn_implementation("eager")
    attentions = model(input_ids=batch, output_attentions=True, use_cache=False).attentions
    model.set_attn_implementation("sdpa")
    model.train()
    return [round(float(a[:, :, 4:, 0].mean()), 4) for a in attentions]


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.data / "tokenizer")
    train_tokens = torch.from_numpy(np.load(args.data / "train.npy").astype(np.int64)).to(device)
    eval_tokens = torch.from_numpy(np.load(args.data / "calibration.npy").astype(np.int64))  # eval split stays unseen
    generator = torch.Generator().manual_seed(args.seed)
    eval_batches = windows(eval_tokens, args.length, 8 * args.eval_batches, generator).view(args.eval_batches, 8, -1)

    model = build_model(len(tokenizer), args).to(device)
    add_residual_dropout(model, args.dropout)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M on {device}, "
          f"{train_tokens.numel() / 1e6:.1f} M training tokens")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                                  fused=device == "cuda")
    budget = args.minutes * 60
    started, step, log, best = time.time(), 0, [], math.inf
    loss = torch.tensor(math.nan)  # logged with the first evaluation, after step 1
    args.out.mkdir(parents=True, exist_ok=True)
    while True:
        elapsed = time.time() - started
        done = elapsed >= budget  # a time budget, not a step count, so the run ends inside the machine's limit
        if step and (done or step % args.eval_every == 0):
            val = held_out_loss(model, eval_batches, device)
            entry = {"step": step, "tokens": step * args.batch * args.length, "seconds": round(elapsed, 1),
                     "lr": optimizer.param_groups[0]["lr"], "train_loss": loss.item(), "eval_loss": val,
                     "eval_ppl": math.exp(val), "sink_share": sink_share(model, eval_batches[0].to(device))}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            if val < best:
                best = val
                bf16 = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
                bf16.pop("lm_head.weight")  # tied to the input embeddings; storing it twice costs 6 MB
                model.save_pretrained(args.out, state_dict=bf16, max_shard_size="15MB")
                tokenizer.save_pretrained(args.out)
        if done:
            break
        warmup = min(1.0, step / args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        batch = windows(train_tokens, args.length, args.batch, generator)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
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
    run.add_argument("--minutes", type=float, default=3.5, help="training wall-clock budget")
    run.add_argument("--length", type=int, default=512)
    run.add_argument("--batch", type=int, default=128)
    run.add_argument("--lr", type=float, default=3e-3)
    run.add_argument("--warmup", type=int, default=200)
    run.add_argument("--eval-every", type=int, default=250)
    run.add_argument("--eval-batches", type=int, default=16)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--layers", type=int, default=6)
    run.add_argument("--hidden", type=int, default=384, help="a multiple of 128; heads of 64")
    run.add_argument("--intermediate", type=int, default=1024, help="a multiple of 128")
    run.add_argument("--gqa", type=int, default=3, help="query heads per KV head")
    run.add_argument("--dropout", type=float, default=0.1, help="residual dropout, training only")
    run.add_argument("--weight-decay", type=float, default=0.1)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.data, args.vocab_size)
    else:
        train(args)


if __name__ == "__main__":
    main()
