"""Every save says, in the folder's README, that the prefix needs the package, and never overwrites a user's card."""

from __future__ import annotations

import pytest
import torch
from loguru import logger
from tiny_models import BOS, EOS, load

from _intactkv_autoload import AUTOLOAD_ENV
from intactkv_modifier import attach_intact_kv, capture_prefix_kv
from intactkv_modifier.checkpoint import CARD_FILE, NEEDS_PACKAGE, read_config_block
from intactkv_modifier.inspection import inspect_checkpoint


@pytest.fixture(scope="module")
def model(tiny_model_dirs) -> torch.nn.Module:
    model = load(tiny_model_dirs["llama"])
    attach_intact_kv(model, [BOS], capture_prefix_kv(model, [BOS]))
    return model


def _save_logging(model: torch.nn.Module, directory) -> list[str]:
    messages: list[str] = []
    sink = logger.add(messages.append, level="INFO", format="{message}")
    try:
        model.save_pretrained(directory)
    finally:
        logger.remove(sink)
    return messages


def test_a_save_writes_a_card_that_says_the_prefix_needs_the_package(model, tmp_path):
    assert _save_logging(model, tmp_path) == []
    card = (tmp_path / CARD_FILE).read_text()
    assert NEEDS_PACKAGE in card and f"{AUTOLOAD_ENV}=0" in card and f"[{BOS}]" in card
    assert inspect_checkpoint(tmp_path).checks[-1].outcome == "ok"


def test_the_next_save_rewrites_our_card_for_the_new_prefix(model, tiny_model_dirs, tmp_path):
    model.save_pretrained(tmp_path)
    other = load(tiny_model_dirs["llama"])
    attach_intact_kv(other, [BOS, EOS], capture_prefix_kv(other, [BOS, EOS]))
    other.save_pretrained(tmp_path)
    assert read_config_block(tmp_path).prefix_token_ids == [BOS, EOS]
    assert f"[{BOS}, {EOS}]" in (tmp_path / CARD_FILE).read_text()


def test_a_users_own_readme_is_kept_and_the_save_says_what_it_lacks(model, tmp_path):
    mine = "# My model\n\nFine-tuned on my data.\n"
    (tmp_path / CARD_FILE).write_text(mine)
    messages = _save_logging(model, tmp_path)
    assert (tmp_path / CARD_FILE).read_text() == mine
    assert len(messages) == 1 and "left as it is" in messages[0] and NEEDS_PACKAGE in messages[0]
    check = inspect_checkpoint(tmp_path).checks[-1]
    assert (check.name, check.outcome) == ("model card", "warning") and NEEDS_PACKAGE in check.detail


def test_a_users_readme_that_names_the_package_passes_quietly(model, tmp_path):
    mine = "# My model\n\nNeeds intactkv-modifier installed for its prefix.\n"
    (tmp_path / CARD_FILE).write_text(mine)
    assert _save_logging(model, tmp_path) == []
    assert (tmp_path / CARD_FILE).read_text() == mine
    assert inspect_checkpoint(tmp_path).checks[-1].outcome == "ok"


def test_a_folder_without_a_card_loads_but_inspect_warns(model, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / CARD_FILE).unlink()
    report = inspect_checkpoint(tmp_path)
    assert report.loads and report.checks[-1].outcome == "warning"
    assert "with warnings (model card)" in report.verdict and "where intactkv-modifier is installed" in report.verdict
