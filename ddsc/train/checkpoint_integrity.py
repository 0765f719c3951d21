"""Autoresume from the newest checkpoint that loads; a corrupt newer one is moved aside (never deleted).

A job killed while it writes a checkpoint, or a full disk, leaves a checkpoint that has the right name but
not all its bytes. Composer and DeepSpeed both resume from what their ``latest`` pointer names, so such a
file stopped every later run (``PytorchStreamReader failed reading zip archive``) although the checkpoint
before it was intact. Before an engine resumes, rank 0 checks the save folder's checkpoints, newest first:

* a ``torch.save`` file is a zip archive with a CRC-32 per record: it is intact when every record reads back
  with its CRC (``zipfile``), which catches a truncated file and flipped bytes alike;
* a Composer sharded folder (FSDP): ``.metadata`` reads back and every tensor's byte range lies within its
  ``.distcp`` file (``.metadata`` is written last, so a folder without it was never finished);
* a DeepSpeed tag folder: every ``.pt`` file is intact and each of the run's ranks saved its optimizer
  partition.

The newest intact checkpoint becomes ``latest`` (the engine's own autoresume then loads it). Every corrupt
checkpoint newer than it is moved to ``save_folder/corrupt/`` and named on the console, so nothing is lost
and the next run does not stumble on it again. Filesystem save folders only (object stores are written
whole by the engines' uploads).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ddsc.errors import InputError

CORRUPT_DIR = "corrupt"
COMPOSER_LATEST = "latest-rank0.pt"  # Composer's save_latest_filename for rank 0
DEEPSPEED_LATEST = "latest"
# Composer's default save_filename (a file; a folder when sharded) and the DeepSpeed engine's tags (TAG_PREFIX).
_COMPOSER_NAME = re.compile(r"ep\d+-ba(?P<batch>\d+)(?:-rank0\.pt)?")
_DEEPSPEED_NAME = re.compile(r"ba(?P<batch>\d+)")
_OPTIM_PARTITION = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")


class CorruptCheckpointError(InputError):
    """A checkpoint file that cannot be read back (truncated, or bytes changed); the message names it."""


def torch_file_problem(path: Path) -> str | None:
    """Why the ``torch.save`` file ``path`` would not load (truncated, a bad CRC), or None when it is intact."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        return f"not a complete torch.save zip archive, truncated? ({err})"
    return None if bad is None else f"record {bad} fails its CRC check, bytes changed on disk"


def sharded_problem(folder: Path) -> str | None:
    """Why the ``torch.distributed.checkpoint`` folder would not load, or None."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(folder)).read_metadata().storage_data
    except Exception as err:  # unpickling a damaged .metadata can fail in many ways
        return f".metadata unreadable, never finished? ({type(err).__name__}: {err})"
    ends: dict[str, int] = {}
    for item in storage.values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for name, end in sorted(ends.items()):
        size = (folder / name).stat().st_size if (folder / name).is_file() else -1
        if size < end:
            return f"{name} is {'missing' if size < 0 else f'{size:,} bytes, expected at least {end:,}'}"
    return None


def composer_problem(path: Path) -> str | None:
    """A Composer checkpoint: monolithic ``.pt`` file or sharded folder."""
    return torch_file_problem(path) if path.is_file() else sharded_problem(path)


def _expected_partitions(model_states: Path) -> int | None:
    """How many optimizer partitions the run saved: one per data-parallel rank under ZeRO (stage >= 1), none
    without it; None when the file's contents cannot be read with ``weights_only`` (another DeepSpeed)."""
    import torch

    try:
        saved = torch.load(model_states, map_location="cpu", mmap=True, weights_only=True)
        zero = saved["ds_config"].get("zero_optimization", {}).get("stage", 0)
        return int(saved["dp_world_size"]) if zero else 0
    except (pickle.UnpicklingError, KeyError, AttributeError):
        return None


def deepspeed_problem(tag: Path) -> str | None:
    """A DeepSpeed tag folder: every ``.pt`` file intact, and an optimizer partition from each saving rank."""
    files = sorted(tag.glob("*.pt"))
    states = [f for f in files if f.name.endswith("model_states.pt")]
    if not states:
        return "no *model_states.pt file, never finished?"
    for f in files:
        problem = torch_file_problem(f)
        if problem is not None:
            return f"{f.name}: {problem}"
    partitions = {int(m.group(1)) for f in files if (m := _OPTIM_PARTITION.fullmatch(f.name))}
    missing = sorted(set(range(_expected_partitions(states[0]) or 0)) - partitions)
    return f"no optimizer partition of rank(s) {missing}, never finished?" if missing else None


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    batch: int


@dataclass
class SaveFolder:
    """One engine's checkpoints in a save folder: how they are named and checked, and its ``latest`` pointer."""

    folder: Path
    pattern: re.Pattern
    problem: Callable[[Path], str | None]
    latest: str
    read_pointer: Callable[[Path], str | None]  # the checkpoint name ``latest`` holds (None: no pointer)
    write_pointer: Callable[[Path, str], None]

    def checkpoints(self) -> list[Checkpoint]:
        """Newest first."""
        found = [
            Checkpoint(path, int(match["batch"]))
            for path in self.folder.iterdir()
            if (match := self.pattern.fullmatch(path.name)) and not path.is_symlink()
        ]
        return sorted(found, key=lambda c: c.batch, reverse=True)

    def point_at(self, checkpoint: Checkpoint | None) -> None:
        """Make ``latest`` name ``checkpoint`` (atomically; no pointer for None, so the engine starts afresh)."""
        latest = self.folder / self.latest
        if checkpoint is None:
            latest.unlink(missing_ok=True)
        elif self.read_pointer(latest) != checkpoint.path.name:
            tmp = latest.with_name(f".{latest.name}.tmp")
            tmp.unlink(missing_ok=True)
            self.write_pointer(tmp, checkpoint.path.name)
            os.replace(tmp, latest)


def _read_link(latest: Path) -> str | None:
    return os.readlink(latest) if latest.is_symlink() else None


def _read_text(latest: Path) -> str | None:
    return latest.read_text() if latest.is_file() else None


def composer_folder(folder: str | Path) -> SaveFolder:
    """Composer: ``latest-rank0.pt`` is a relative symlink to the checkpoint file (or sharded folder)."""
    return SaveFolder(Path(folder), _COMPOSER_NAME, composer_problem, COMPOSER_LATEST, _read_link, Path.symlink_to)


def deepspeed_folder(folder: str | Path) -> SaveFolder:
    """DeepSpeed: ``latest`` is a text file holding the tag."""
    return SaveFolder(Path(folder), _DEEPSPEED_NAME, deepspeed_problem, DEEPSPEED_LATEST, _read_text, Path.write_text)


@dataclass
class Recovery:
    """What ``recover`` found: the checkpoint to resume from (None: start afresh) and what it moved aside."""

    resume_from: Checkpoint | None = None
    moved: list[tuple[Path, Path, str]] = field(default_factory=list)  # (from, to, why)

    def report(self) -> list[str]:
        lines = [f"autoresume: checkpoint {src} is corrupt: {why}; moved to {dst}" for src, dst, why in self.moved]
        if self.moved:
            lines.append(
                f"autoresume: resuming from {self.resume_from.path}"
                if self.resume_from
                else "autoresume: no intact checkpoint left; starting from the beginning"
            )
        return lines


def _move_aside(path: Path) -> Path:
    """``path`` -> ``corrupt/<name>`` beside it (``<name>.1``, ... when that is taken); returns the new path."""
    target_dir = path.parent / CORRUPT_DIR
    target_dir.mkdir(exist_ok=True)
    target, n = target_dir / path.name, 0
    while target.exists() or target.is_symlink():
        n += 1
        target = target_dir / f"{path.name}.{n}"
    shutil.move(str(path), str(target))
    return target


def recover(save: SaveFolder) -> Recovery:
    """Point ``latest`` at the newest intact checkpoint, moving corrupt newer ones aside (see module docstring)."""
    recovery = Recovery()
    if not save.folder.is_dir():
        return recovery
    for checkpoint in save.checkpoints():
        why = save.problem(checkpoint.path)
        if why is None:
            recovery.resume_from = checkpoint
            break
        recovery.moved.append((checkpoint.path, _move_aside(checkpoint.path), why))
    if recovery.moved or recovery.resume_from is not None:
        save.point_at(recovery.resume_from)
    return recovery


def recover_on_rank_zero(save: SaveFolder, rank: int, barrier: Callable[[], None]) -> None:
    """Rank 0 recovers (and reports on stderr) while the other ranks wait, before any rank loads ``latest``."""
    if rank == 0:
        for line in recover(save).report():
            print(line, file=sys.stderr, flush=True)
    barrier()
