"""The real English text that trains, calibrates and evaluates the project's models, offline.

Two Debian packages, both plain English written by people:

* ``dict-gcide``: the GNU Collaborative International Dictionary of English
  (Webster's 1913 plus later additions; GPL), ~28 MB of definitions and literary
  quotations once cleaned of dictionary markup;
* ``python3.11-doc``: the Python documentation's reStructuredText sources (PSF
  licence), ~11 MB of expository prose (tutorial, library reference, HOWTOs).

Every document (a dictionary entry, a documentation page) goes to a split by a
hash of its name, so evaluation text never overlaps calibration or training
text, whatever order they are read in.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

__all__ = [
    "CORPUS_PATH", "PYTHON_DOCS", "Split", "clean_rst_roles", "corpus_documents", "load_corpus_text",
    "require_corpus", "split_of",
]

CORPUS_PATH = Path("/usr/share/dictd/gcide.dict.dz")
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
Split = Literal["train", "calibration", "eval"]

# Buckets of 1000 by headword hash: 2 % evaluation, 2 % calibration, the rest training.
_BUCKETS: dict[Split, range] = {"eval": range(0, 20), "calibration": range(20, 40), "train": range(40, 1000)}

_HEADWORD = re.compile(r"^([^\s\\][^\\\n]*?)\s*\\", re.MULTILINE)
_PRONUNCIATION = re.compile(r"\\[^\\\n]*\\")
_SOURCE_TAG = re.compile(
    r"\[(?:1913 Webster|PJC|WordNet 1\.5|Century Dict\.|Webster 1913 Suppl\.|RHUD|MW10|AS|Chambers 1881)[^\]]*\]"
)
_BRACES = re.compile(r"[{}]")
_PARENTHESISED_PRONUNCIATION = re.compile(r"\((?=[^)\n]*[*\"])[^)\n]*\)")
_SPACE_BEFORE_PUNCTUATION = re.compile(r" +([,.;:])")
_BLANK_LINES = re.compile(r"\n\s*\n+")
_RST_MARKUP = re.compile(r"^\s*(\.\. |:[a-z-]+:|[=\-~^*#\"']{3,}\s*$)")
_RST_ROLES = re.compile(r":[a-z:]+:`([^`<]*?)(?:\s*<[^>]*>)?`")


def load_corpus_text(split: Split) -> str:
    """All entries of one split as plain text, one entry per paragraph, in dictionary order."""
    return "\n\n".join(text for _, text in corpus_documents(split))


def corpus_documents(split: Split) -> list[tuple[str, str]]:
    """``(name, text)`` of every document of one split: ``gcide:<headword>`` entries, then ``pydoc:<page>`` pages."""
    if split not in _BUCKETS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(_BUCKETS)}")
    return _entries_by_split()[split]


def split_of(name: str) -> Split:
    """The split a document belongs to, by a hash of its name: anything derived from it stays in that split."""
    bucket = int(hashlib.sha1(name.lower().encode()).hexdigest(), 16) % 1000
    return next(split for split, span in _BUCKETS.items() if bucket in span)


def clean_rst_roles(line: str) -> str:
    """``:func:`len``` -> ``len``: the reStructuredText roles the documentation text is full of, as plain names."""
    return _RST_ROLES.sub(r"\1", line)


def require_corpus() -> None:
    """Raise with the install command when either Debian package is missing."""
    missing = [f"{path} (apt-get install {package})" for path, package in
               ((CORPUS_PATH, "dict-gcide"), (PYTHON_DOCS, "python3.11-doc")) if not path.exists()]
    if missing:
        raise FileNotFoundError(
            "The real-English corpus is not installed: " + "; ".join(missing) + ". Both are Debian packages; "
            "`bash scripts/main.sh` installs them."
        )


@lru_cache(maxsize=1)
def _entries_by_split() -> dict[Split, list[tuple[str, str]]]:
    require_corpus()
    splits: dict[Split, list[tuple[str, str]]] = {name: [] for name in _BUCKETS}
    for name, text in [*_dictionary_entries(), *_documentation_pages()]:
        if len(text) >= 40:
            splits[split_of(name)].append((name, text))
    return splits


def _dictionary_entries() -> list[tuple[str, str]]:
    with gzip.open(CORPUS_PATH, "rt", encoding="utf-8", errors="replace") as handle:
        raw = handle.read()
    return [(f"gcide:{headword}", _clean(body)) for headword, body in _split_entries(raw)]


def _documentation_pages() -> list[tuple[str, str]]:
    pages = []
    for path in sorted(PYTHON_DOCS.rglob("*.rst.txt")):
        lines = [clean_rst_roles(line) for line in path.read_text(errors="replace").splitlines()]
        kept = "\n".join(line for line in lines if not _RST_MARKUP.match(line))
        paragraphs = [" ".join(p.split()) for p in _BLANK_LINES.split(kept)]
        pages.append((f"pydoc:{path.relative_to(PYTHON_DOCS)}", "\n".join(p for p in paragraphs if p)))
    return pages


def _split_entries(raw: str) -> list[tuple[str, str]]:
    """(headword, entry text) pairs; an entry starts with an unindented ``Word \\Pro*nun"ci*a`tion\\`` line."""
    starts = [m for m in _HEADWORD.finditer(raw) if not m.group(1).startswith("00-database")]
    return [
        (match.group(1), raw[match.start() : starts[i + 1].start() if i + 1 < len(starts) else len(raw)])
        for i, match in enumerate(starts)
    ]


def _clean(entry: str) -> str:
    text = _PRONUNCIATION.sub("", entry)
    text = _SOURCE_TAG.sub("", text)
    text = _PARENTHESISED_PRONUNCIATION.sub("", _BRACES.sub("", text))
    paragraphs = [_SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(p.split())) for p in _BLANK_LINES.split(text)]
    return "\n".join(p for p in paragraphs if p)
