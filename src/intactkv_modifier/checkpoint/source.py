"""Finding a checkpoint's files on this machine: a local folder, or a hub repository's cached snapshot.

Transformers' loader and vLLM's plugin and connector all go through
:func:`checkpoint_folder`, with the credentials, revision and cache folder the
user gave them, so a gated or private repository, a pinned revision or a custom
download folder reads the same config and side file as the weights came from.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from intactkv_modifier.checkpoint.side_file import SIDE_FILE_PATH

__all__ = ["HubAccess", "checkpoint_folder", "is_hub_id"]


class HubAccess(BaseModel):
    """How to reach a hub repository: what ``from_pretrained`` and vLLM's engine arguments were given."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    revision: str | None = None
    token: bool | str | None = None
    cache_dir: str | os.PathLike[str] | None = None
    subfolder: str = ""
    local_files_only: bool = False
    force_download: bool = False


def is_hub_id(source: str) -> bool:
    """``owner/name`` or ``name``: what huggingface_hub accepts as a repository id (URLs and paths are not)."""
    if "://" in source or source.startswith(("/", ".", "~")) or source.count("/") > 1:
        return False
    return bool(source)


def checkpoint_folder(source: str | os.PathLike[str], access: HubAccess) -> Path:
    """The local folder that holds ``source``'s config.json and, when the repository has one, its side file.

    Raises ``ValueError`` for a source that is neither a folder nor a hub id (an
    ``s3://`` URL, say), and lets huggingface_hub's errors (missing repository,
    gated without a token, offline without a cached copy) through: a caller that
    must know whether the model declares IntactKV cannot guess.
    """
    path = Path(source)
    if path.is_dir():
        return path / access.subfolder
    if not is_hub_id(str(source)):
        raise ValueError(
            f"{source} is neither a local checkpoint folder nor a hub repository id; intactkv-modifier cannot read "
            "its config.json and side file from there. Download the checkpoint to a folder and serve that folder."
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    download = {
        "revision": access.revision,
        "token": access.token,
        "cache_dir": access.cache_dir,
        "subfolder": access.subfolder or None,
        "local_files_only": access.local_files_only,
        "force_download": access.force_download,
    }
    config = Path(hf_hub_download(str(source), "config.json", **download))
    # No side file: a checkpoint of the older layout, or not IntactKV; the reader decides.
    with contextlib.suppress(EntryNotFoundError):
        hf_hub_download(str(source), SIDE_FILE_PATH, **download)
    return config.parent
