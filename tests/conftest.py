"""Shared fixtures: tiny saved models, and quiet, deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES, save_tiny_chat_model, save_tiny_model, text_samples

# The thread count changes how torch splits its reductions (so their summation order): CI runs the numerically
# sensitive tests with 1 and 2 threads (scripts/test_numerics.sh), 2 is what the plain test command uses.
THREADS = int(os.environ.get("INTACTKV_TEST_THREADS", "2"))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No BOS, a chat template with a default system turn (see ``tiny_models.CHAT_TEMPLATE``)."""
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "chat")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain-text file for the command line's --dataset / text windows."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n".join(text_samples(16, 40)))
    return path
