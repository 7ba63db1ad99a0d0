"""Tiny random decoder models with real tokenizers, saved to disk as llm-compressor wants them.

Random weights are fine here: these models test mechanics (equality of tensors
and logits), never quality. Sizes are multiples of 128 so W4A16's group size fits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

WORDS = [f"w{i}" for i in range(120)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_MARKERS = ["<|im_start|>", "<|im_end|>"]  # after the words: ids 124 and 125
PAD, BOS, EOS = 0, 1, 2
IM_START, IM_END = 124, 125
VOCAB_SIZE = 128

# A ChatML-like template over the tiny vocabulary, with a default system prompt as SmolLM2's has; roles are
# words of the vocabulary, and every piece is space-separated for the whitespace pre-tokenizer.
CHAT_SYSTEM_TURN = "<|im_start|> w100 w110 w111 w112 <|im_end|> "
CHAT_TEMPLATE = (
    "{% set roles = {'system': 'w100', 'user': 'w101', 'assistant': 'w102'} %}"
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '" + CHAT_SYSTEM_TURN + "' }}{% endif %}"
    "{{ '<|im_start|> ' + roles[message['role']] + ' ' + message['content'] + ' <|im_end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|> w102 ' }}{% endif %}"
)

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
# Gemma 3 as the real gemma-3-270m is built: one KV head, QK-norm, tied embeddings, and a
# sliding-window layer before a full-attention one (window short enough for tests to cross it).
GEMMA3_SLIDING_WINDOW = 16


def build_tokenizer(adds_bos: bool, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer; with ``chat_template`` a chat model's, whose EOS ends a turn (``<|im_end|>``)."""
    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS + CHAT_MARKERS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>" if adds_bos else None,
        eos_token="<|im_end|>" if chat_template else "</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        chat_template=chat_template,
    )


def build_config(architecture: str, layers: int = 2):
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=64,
        pad_token_id=PAD,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    if architecture == "llama":
        return LlamaConfig(bos_token_id=BOS, **common)
    if architecture == "qwen2":
        return Qwen2Config(bos_token_id=None, **common)
    if architecture == "qwen3":
        return Qwen3Config(bos_token_id=BOS, **common)
    if architecture == "gemma3":
        return Gemma3TextConfig(
            bos_token_id=BOS,
            **{**common, "num_key_value_heads": 1, "tie_word_embeddings": True},
            query_pre_attn_scalar=32,
            sliding_window=GEMMA3_SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        )
    raise ValueError(architecture)


def save_tiny_model(architecture: str, directory: Path, seed: int = 0, layers: int = 2) -> Path:
    """Random model and tokenizer in ``directory``; Llama and Qwen3 tokenizers add BOS, Qwen2's does not."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(architecture, layers), attn_implementation="eager")
    _give_first_token_a_sink(model)
    model.save_pretrained(directory)
    build_tokenizer(adds_bos=architecture != "qwen2").save_pretrained(directory)
    return directory


def save_tiny_chat_model(directory: Path, seed: int = 0) -> Path:
    """A chat model as SmolLM2 is one: a Llama without BOS, a chat template with a default system turn,
    ``<|im_start|>`` first. (Llama, not Qwen2: AutoTokenizer keeps our vocabulary for it.)"""
    torch.manual_seed(seed)
    config = build_config("llama")
    config.bos_token_id = None
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _give_first_token_a_sink(model, IM_START)
    model.save_pretrained(directory)
    build_tokenizer(adds_bos=False, chat_template=CHAT_TEMPLATE).save_pretrained(directory)
    return directory


def _give_first_token_a_sink(model: PreTrainedModel, token: int = BOS) -> None:
    """Scale the first token's embedding up so it behaves like a real pivot token."""
    with torch.no_grad():
        model.get_input_embeddings().weight[token] *= 20


def load(directory: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32).eval()


def load_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """Not AutoTokenizer: for Qwen2 it forces Qwen2's own BPE class, which ignores our vocabulary."""
    return PreTrainedTokenizerFast.from_pretrained(directory)


def text_samples(count: int, length: int, seed: int = 1) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[i] for i in torch.randint(len(WORDS), (length,), generator=generator).tolist())
        for _ in range(count)
    ]


def calibration_dataset(tokenizer: PreTrainedTokenizerFast, count: int = 4, length: int = 24) -> Dataset:
    encoded = tokenizer(text_samples(count, length))
    return Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of prompts of unequal length, padded on the left as ``generate`` expects, with its attention mask."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def run_python(
    code: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    python: str | Path = sys.executable,
) -> Any:
    """Run ``code`` in a fresh interpreter (import-time and environment effects) and return the JSON it printed.

    The code reports by printing one line ``RESULT <json>``; anything else on stdout or stderr is ignored.
    ``python`` is another environment's interpreter where the code needs it (the serving one, for vLLM).
    """
    result = subprocess.run(
        [str(python), "-c", code, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(row for row in result.stdout.splitlines() if row.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])
