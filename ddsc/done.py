"""Done markers: a step's output folder records what it was made from, so a re-run with the same inputs skips it.

``make demo`` (and any pipeline) re-runs every step; each step must tell by itself that its output is already
complete, or a re-run redoes minutes of work (evaluation) or, worse, replaces good output. The record is a
digest of the step's settings and of its input files' sizes and modification times (as ``make`` judges a
target by its inputs' times; hashing gigabytes of checkpoint would cost what the skip saves), written as the
step's very last act (and removed first by a step that rewrites its output in place): a step killed halfway
leaves no marker, so the re-run does the work again. Only the digest is stored, never the paths, since outputs
such as model folders are shared.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MARKER = ".ddsc-done.json"


def _file_stats(path: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of ``path``, or of every file under it (names relative to it)."""
    if path.is_file():
        stat = path.stat()
        return [(str(path.resolve()), stat.st_size, stat.st_mtime_ns)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MARKER)
    return [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


@dataclass(frozen=True)
class StepInputs:
    """What a step's output depends on: its settings and input files (missing ones count as absent)."""

    digest: str

    @classmethod
    def of(cls, files: Iterable[str | Path | None], settings: dict) -> StepInputs:
        """``files`` may hold None (an optional input not given) and missing paths (counted as absent)."""
        present = [Path(f) for f in files if f is not None and Path(f).exists()]
        described = {"settings": settings, "files": {str(f.resolve()): _file_stats(f) for f in present}}
        text = json.dumps(described, sort_keys=True, default=str)
        return cls(hashlib.sha256(text.encode()).hexdigest())

    def done_in(self, out: str | Path) -> bool:
        """True when ``out`` was completed from exactly these inputs."""
        marker = Path(out) / MARKER
        return marker.is_file() and json.loads(marker.read_text()).get("inputs") == self.digest

    @staticmethod
    def begin(out: str | Path) -> None:
        """Remove ``out``'s marker before a step rewrites it in place (a run killed halfway must not leave an
        older run's marker on half-replaced output)."""
        (Path(out) / MARKER).unlink(missing_ok=True)

    def mark_done(self, out: str | Path) -> None:
        """Record (atomically) that ``out`` is complete for these inputs; call when the step has finished."""
        marker = Path(out) / MARKER
        tmp = marker.with_name(f"{MARKER}.tmp")
        tmp.write_text(json.dumps({"inputs": self.digest}))
        os.replace(tmp, marker)
