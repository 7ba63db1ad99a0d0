"""Build hook: installs ``intactkv-modifier-autoload.pth`` into site-packages; everything else is in pyproject.toml.

A ``.pth`` file works only at the top of site-packages, where no package-data
option can put it, so ``build_py`` copies it there: into ``build_lib`` for a
wheel (whose root is installed into site-packages), and into the editable wheel
itself for ``pip install -e`` (setuptools points ``install_lib`` at the editable
wheel's folder, whose root is installed the same way; its ``build_lib`` is thrown
away). ``tests/test_autoload.py`` checks that the installed file is there.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = os.path.join("src", "intactkv-modifier-autoload.pth")


class BuildPyWithStartupHook(build_py):
    """``build_py`` plus the ``.pth`` file at the root of what gets installed."""

    def run(self) -> None:
        super().run()
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.mkpath(root)
        self.copy_file(PTH, os.path.join(root, os.path.basename(PTH)), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:  # written into the editable wheel, not build_lib
            return outputs
        return [*outputs, os.path.join(self.build_lib, os.path.basename(PTH))]

    def get_source_files(self) -> list[str]:
        return [*super().get_source_files(), PTH]  # so that the sdist carries it


setup(cmdclass={"build_py": BuildPyWithStartupHook})
