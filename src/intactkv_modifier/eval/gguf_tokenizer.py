"""A correct fast tokenizer for a model shipped as GGUF.

Two cases. A GPT-2-style byte-level BPE vocabulary (SmolLM2: ``tokenizer.ggml.model``
``gpt2``, merges stored) converts correctly with transformers' own GGUF
conversion, whose special tokens are then set from the GGUF's fields (transformers
5.17 makes EOS the BOS piece and sets no pad token). A SentencePiece-BPE
vocabulary (Gemma 3) is rebuilt here:

transformers' own GGUF tokenizer conversion gets Gemma 3 wrong (it splits
"capital" into c/ap/it/al), so the tokenizer is rebuilt here from what the GGUF
file stores: the pieces, their scores and their types. SentencePiece's BPE
merges the adjacent pair whose merged piece scores highest; a `tokenizers` BPE
model reproduces that when its merge ranks follow the merged pieces' scores.
Spaces are SentencePiece's "▁", there is no dummy prefix (Gemma adds none), and
unknown bytes fall back to the ``<0xNN>`` pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = ["GGUFVocabulary", "converted_bpe_tokenizer", "read_gguf_vocabulary", "sentencepiece_bpe_tokenizer"]

SPACE = "\u2581"  # SentencePiece's visible space

# token types as GGUF stores them (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class GGUFVocabulary:
    """The tokenizer fields of a GGUF file, pieces already in SentencePiece's spelling (spaces as "▁")."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    add_bos: bool


def read_gguf_vocabulary(path: Path) -> GGUFVocabulary:
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    model = fields["tokenizer.ggml.model"].contents()
    if model != "llama":
        raise ValueError(
            f"{path.name} holds a {model!r} tokenizer; only SentencePiece ('llama') GGUF vocabularies are supported"
        )

    def scalar(name: str) -> int:
        return int(fields[name].contents())

    return GGUFVocabulary(
        pieces=[piece.replace(" ", SPACE) for piece in fields["tokenizer.ggml.tokens"].contents()],
        scores=[float(score) for score in fields["tokenizer.ggml.scores"].contents()],
        types=[int(kind) for kind in fields["tokenizer.ggml.token_type"].contents()],
        bos_id=scalar("tokenizer.ggml.bos_token_id"),
        eos_id=scalar("tokenizer.ggml.eos_token_id"),
        unk_id=scalar("tokenizer.ggml.unknown_token_id"),
        pad_id=scalar("tokenizer.ggml.padding_token_id"),
        add_bos=bool(fields["tokenizer.ggml.add_bos_token"].contents()),
    )


def converted_bpe_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """transformers' conversion of the GGUF's byte-level BPE tokenizer, chat template included, with the
    BOS/EOS/PAD pieces the GGUF names (EOS ends a chat turn: ``generate`` and padding rely on it)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    model = fields["tokenizer.ggml.model"].contents()
    if model != "gpt2":
        raise ValueError(f"{path.name} holds a {model!r} tokenizer; this conversion is for byte-level BPE ('gpt2')")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.clean_up_tokenization_spaces = False  # it would strip spaces before punctuation from BPE text
    context = f"{fields['general.architecture'].contents()}.context_length"
    if context in fields:
        tokenizer.model_max_length = int(fields[context].contents())
    for role in ("bos", "eos", "pad"):
        key = f"tokenizer.ggml.{'padding' if role == 'pad' else role}_token_id"
        if key in fields:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(fields[key].contents())))
    return tokenizer


def sentencepiece_bpe_tokenizer(vocabulary: GGUFVocabulary, special_pieces: frozenset[str]) -> PreTrainedTokenizerFast:
    """The fast tokenizer; ``special_pieces`` (besides BOS/EOS/UNK/PAD) are skipped when decoding with
    ``skip_special_tokens`` (chat-turn and image markers), other control pieces are kept as text."""
    pieces = vocabulary.pieces
    ids = {piece: index for index, piece in enumerate(pieces)}
    bpe = models.BPE(
        vocab=ids,
        merges=_merges_by_score(vocabulary, ids),
        unk_token=pieces[vocabulary.unk_id],
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(" "), behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    named = {vocabulary.bos_id, vocabulary.eos_id, vocabulary.unk_id, vocabulary.pad_id}
    tokenizer.add_tokens(
        [
            AddedToken(piece, normalized=False, special=index in named or piece in special_pieces)
            for index, (piece, kind) in enumerate(zip(pieces, vocabulary.types))
            if kind in (_CONTROL, _USER_DEFINED, _UNKNOWN)
        ]
    )
    bos = pieces[vocabulary.bos_id]
    if vocabulary.add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocabulary.bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=pieces[vocabulary.eos_id],
        unk_token=pieces[vocabulary.unk_id],
        pad_token=pieces[vocabulary.pad_id],
        add_bos_token=vocabulary.add_bos,
        padding_side="left",
    )


def _merges_by_score(vocabulary: GGUFVocabulary, ids: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a normal or user-defined piece into two known pieces, in SentencePiece's priority.

    User-defined pieces (Gemma's runs of spaces, tabs and newlines) are whole units to SentencePiece, so
    their merges come before every normal one, longest left part first; normal merges follow by the merged
    piece's score. Remaining ties are broken by the halves' ids, so the ranks are deterministic.
    """
    ranked: list[tuple[tuple[float, ...], str, str]] = []
    for piece, score, kind in zip(vocabulary.pieces, vocabulary.scores, vocabulary.types):
        if kind not in (_NORMAL, _USER_DEFINED) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                if kind == _USER_DEFINED:
                    key: tuple[float, ...] = (0, -len(left), -len(right), ids[left])
                else:
                    key = (1, -score, ids[left], ids[right])
                ranked.append((key, left, right))
    ranked.sort(key=lambda merge: merge[0])
    return [(left, right) for _, left, right in ranked]
