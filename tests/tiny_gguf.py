"""A tiny chat model written as a GGUF file the way SmolLM2's is: Llama tensors, a byte-level BPE ("gpt2")
vocabulary with merges, no BOS added, EOS/PAD = ``<|im_end|>``, a ChatML template with a default system prompt.

Random float32 weights: it tests the preparation mechanics (unzip, checksum, conversion, special tokens,
save and reload), never quality.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

SYSTEM_PROMPT = "<|im_start|>system\nBe brief.<|im_end|>\n"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '" + SYSTEM_PROMPT.replace("\n", "\\n") + "' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["\u0120 t", "h e", "\u0120t he"]
# "the the": "t", "he", "Ġthe" (byte pieces follow the three specials in byte order: "t" is 3 + 116)
GOLDEN = {"the the": [119, 259 + 1, 259 + 2]}
_LAYER_TENSORS = [
    ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
]


def byte_pieces() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(extra)) for byte in range(256)]


def write_tiny_chat_gguf(path: Path, layers: int = 2) -> Path:
    import gguf

    tokens = SPECIALS + byte_pieces() + ["\u0120t", "he", "\u0120the"]
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    weights = AutoModelForCausalLM.from_config(config).state_dict()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(16)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for layer in range(layers):
        names.update({f"model.layers.{layer}.{ours}.weight": f"blk.{layer}.{theirs}.weight"
                      for ours, theirs in _LAYER_TENSORS})
    for ours, theirs in names.items():
        writer.add_tensor(theirs, weights[ours].numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def wheel_with(path: Path, members: dict[str, bytes | Path]) -> Path:
    """A zip file (a wheel to ``zipfile``) holding ``members``."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            if isinstance(content, Path):
                archive.write(content, name)
            else:
                archive.writestr(name, content)
    return path
