"""Writing and removing checkpoint files so that a crash never leaves half a file behind.

Every file IntactKV adds to a checkpoint goes through :func:`write_atomically`:
written beside its final name, flushed to disk, then renamed over it, with the
folder flushed too, so after a crash or a power loss the name holds either the
old or the new bytes. The temporary file is created with mode ``0o666`` so that
the user's umask applies, as it does to the files transformers writes; it is
removed when anything fails.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["remove_durably", "write_atomically"]


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data``: old bytes or new bytes after any crash, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(handle, view) :]
            os.fsync(handle)
        finally:
            os.close(handle)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def remove_durably(path: Path) -> None:
    """Remove ``path`` (if present) and make the removal survive a crash."""
    if path.exists():
        path.unlink()
        _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """A rename or unlink is durable only once its folder is flushed (POSIX; a no-op where folders cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
