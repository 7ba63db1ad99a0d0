"""The checkpoint's model card: where someone without intactkv-modifier learns that the prefix needs it.

Without the package, transformers and vLLM ignore the ``intactkv_config`` block
and the side file and load the plain quantized model, with no warning. The
folder itself must say so, for the person who copies it or opens its hub page.
So every save of an IntactKV model writes ``README.md``, unless the folder
holds a README that intactkv-modifier did not write: a user's own card is never
overwritten (:func:`write_model_card` reports it instead, and the save logs
whether it names the package). A card we wrote carries :data:`CARD_MARKER` and is
rewritten by the next save, so it never describes an older prefix.

Transformers writes a card only for ``push_to_hub``, and our save takes the
upload over, so before this module no IntactKV save wrote any.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from _intactkv_autoload import AUTOLOAD_ENV
from intactkv_modifier.checkpoint.files import write_atomically
from intactkv_modifier.checkpoint.side_file import SIDE_FILE_PATH
from intactkv_modifier.config import CONFIG_KEY, IntactKVConfig

__all__ = [
    "CARD_FILE",
    "CARD_MARKER",
    "NEEDS_PACKAGE",
    "PACKAGE",
    "card_mentions_package",
    "model_card",
    "write_model_card",
]

PACKAGE = "intactkv-modifier"
#: The sentence the card, the README and ``intactkv inspect`` all say.
NEEDS_PACKAGE = (
    f"The intact prefix needs the `{PACKAGE}` package installed (`pip install {PACKAGE}`): without it, "
    "transformers and vLLM load this checkpoint as the plain quantized model, silently."
)
CARD_FILE = "README.md"
#: The line that marks a card as ours, to be rewritten by the next save.
CARD_MARKER = (
    f"<!-- model card written by {PACKAGE}; every save rewrites it: delete this line to keep your edits -->"
)


def model_card(config: IntactKVConfig) -> str:
    """The card's Markdown for a checkpoint whose block is ``config``."""
    ids = config.prefix_token_ids
    tokens = "token" if len(ids) == 1 else f"{len(ids)} tokens"
    return f"""---
tags:
- intactkv
---
{CARD_MARKER}

# IntactKV checkpoint

This checkpoint keeps the full-precision KV cache of its prompts' first {tokens} (token ids {ids}), as
IntactKV ([arXiv 2403.01241](https://arxiv.org/abs/2403.01241)) prescribes: `{SIDE_FILE_PATH}` holds the
prefix K/V, and the `{CONFIG_KEY}` block of `config.json` declares them.

**{NEEDS_PACKAGE}**

With the package installed, nothing else is needed:

- transformers: `AutoModelForCausalLM.from_pretrained(...)` applies the prefix in any Python program (lm-eval's
  `hf` backend, pipelines, your scripts) with no `import intactkv_modifier`. `{AUTOLOAD_ENV}=0` turns that off;
  a program that imports `intactkv_modifier` still gets the prefix.
- vLLM: `vllm serve` and `LLM(model=...)` use the prefix through the package's plugin (`VLLM_PLUGINS=""` turns it
  off).

A prompt gets the stored prefix only when it starts with exactly these token ids; any other prompt runs as the
plain quantized model. Copy the `{Path(SIDE_FILE_PATH).parent}/` folder along with the weights;
`intactkv inspect FOLDER` checks a copy.
"""


def card_mentions_package(directory: Path) -> bool:
    """Whether the folder's README names intactkv-modifier (so a reader can learn the prefix needs it)."""
    path = directory / CARD_FILE
    return path.is_file() and PACKAGE in path.read_text(errors="replace")


def write_model_card(directory: Path, config: IntactKVConfig) -> Literal["written", "kept"]:
    """Write the card into ``directory`` unless it holds a README we did not write; say which happened."""
    path = directory / CARD_FILE
    if path.is_file() and CARD_MARKER not in path.read_text(errors="replace"):
        return "kept"
    write_atomically(path, model_card(config).encode())
    return "written"
