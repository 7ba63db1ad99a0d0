"""The recipes shipped with the package, found by a short name.

They are package data so that an installed wheel (and the ``intactkv`` command)
finds them without a clone of the repository; the repository's top-level
``recipes/`` folder only points here, so there is one copy to keep right.
A file ``gptq_w4a16_intactkv.yaml`` is named ``gptq-w4a16``: the ``_intactkv``
every shipped recipe carries is dropped and underscores become dashes.
"""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path

__all__ = ["recipe_summary", "resolve_recipe", "shipped_recipes"]

_SUFFIX = ".yaml"


def shipped_recipes() -> dict[str, Path]:
    """Short name -> file of every shipped recipe, sorted by name."""
    found: dict[str, Path] = {}
    for entry in files(__name__).iterdir():
        if entry.name.endswith(_SUFFIX):
            with as_file(entry) as path:  # a real file for every install layout but zip imports
                found[_short_name(entry.name)] = Path(path)
    return dict(sorted(found.items()))


def resolve_recipe(name_or_path: str) -> Path:
    """A shipped recipe's file by short name, or the YAML file a path names.

    Raises ``FileNotFoundError`` listing the shipped names when it is neither.
    """
    shipped = shipped_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"no recipe {name_or_path!r}: give a shipped recipe ({', '.join(shipped)}) or the path of a YAML recipe"
    )


def recipe_summary(path: Path) -> str:
    """The first sentence of the comment a recipe file opens with (every shipped recipe has one)."""
    comment = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.removeprefix("#").strip())
    text = " ".join(comment)
    return text.split(". ")[0].removesuffix(".")


def _short_name(file_name: str) -> str:
    return file_name.removesuffix(_SUFFIX).replace("_intactkv", "").replace("_", "-")
