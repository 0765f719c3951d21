"""Run a script in a fresh interpreter where ``ddsc`` (and any other named top-level packages) cannot be
imported, as a user of an exported folder without ddsc would; transformers' remote-code cache goes to
``tmp_path``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Block())
"""


def run_without(script: str, tmp_path: Path, blocked: tuple[str, ...] = ("ddsc",)) -> subprocess.CompletedProcess:
    """``script`` (dedented Python) run after an import blocker for ``blocked``, in ``tmp_path``."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    code = BLOCKER.format(blocked=tuple(blocked)) + script
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
