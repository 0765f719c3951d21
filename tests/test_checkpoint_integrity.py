"""Which checkpoints load: truncated or changed files are found, moved aside (never deleted), ``latest`` repointed.

The engines' own resume-from-a-corrupt-checkpoint runs are in test_train.py (Composer) and
test_train_deepspeed.py (DeepSpeed); here the checks on real ``torch.save`` / ``torch.distributed.checkpoint``
files, without training.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from ddsc.train.checkpoint_integrity import (
    composer_folder,
    composer_problem,
    deepspeed_folder,
    deepspeed_problem,
    recover,
)


def _save(path: Path, seed: int) -> None:
    torch.save({"state": {"model": {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))}}}, path)


def _composer_run(folder: Path) -> list[Path]:
    folder.mkdir()
    paths = [folder / f"ep0-ba{b}-rank0.pt" for b in (4, 8, 12)]
    for i, path in enumerate(paths):
        _save(path, i)
    (folder / "latest-rank0.pt").symlink_to(paths[-1].name)
    return paths


def test_a_truncated_newest_and_a_changed_next_are_moved_aside_and_latest_points_at_the_intact_one(tmp_path):
    ba4, ba8, ba12 = _composer_run(tmp_path / "run")
    assert composer_problem(ba12) is None
    full = ba12.read_bytes()
    ba12.write_bytes(full[: len(full) * 2 // 3])  # killed while writing
    assert "not a complete torch.save zip archive" in composer_problem(ba12)
    changed = bytearray(ba8.read_bytes())
    changed[len(changed) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    ba8.write_bytes(bytes(changed))
    assert "fails its CRC check" in composer_problem(ba8)

    recovery = recover(composer_folder(tmp_path / "run"))
    assert recovery.resume_from.path == ba4 and recovery.resume_from.batch == 4
    corrupt = tmp_path / "run" / "corrupt"
    assert [(src, dst) for src, dst, _ in recovery.moved] == [(ba12, corrupt / ba12.name), (ba8, corrupt / ba8.name)]
    assert (corrupt / ba12.name).read_bytes() == full[: len(full) * 2 // 3] and not ba12.exists()
    assert (tmp_path / "run" / "latest-rank0.pt").resolve() == ba4
    lines = recovery.report()
    assert lines[0].startswith(f"autoresume: checkpoint {ba12} is corrupt: not a complete torch.save zip archive")
    assert lines[-1] == f"autoresume: resuming from {ba4}"
    assert recover(composer_folder(tmp_path / "run")).moved == []  # nothing left to move


def test_no_intact_checkpoint_left_starts_afresh_and_a_name_taken_in_corrupt_is_not_overwritten(tmp_path):
    paths = _composer_run(tmp_path / "run")
    (tmp_path / "run" / "corrupt").mkdir()
    (tmp_path / "run" / "corrupt" / paths[0].name).write_bytes(b"an earlier one")
    for path in paths:
        path.write_bytes(b"")
    recovery = recover(composer_folder(tmp_path / "run"))
    assert recovery.resume_from is None and len(recovery.moved) == 3
    assert (tmp_path / "run" / "corrupt" / f"{paths[0].name}.1").exists()
    assert (tmp_path / "run" / "corrupt" / paths[0].name).read_bytes() == b"an earlier one"
    assert not (tmp_path / "run" / "latest-rank0.pt").is_symlink()  # the engine starts from batch 0
    assert recovery.report()[-1] == "autoresume: no intact checkpoint left; starting from the beginning"


def test_sharded_checkpoint_needs_its_metadata_and_every_byte_range(tmp_path):
    folder = tmp_path / "ep0-ba8"
    dcp.save({"state": {"model": {"w": torch.randn(256, 64)}}}, checkpoint_id=str(folder), no_dist=True)
    assert composer_problem(folder) is None
    (shard,) = folder.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:1000])
    assert f"{shard.name} is 1,000 bytes, expected at least" in composer_problem(folder)
    (folder / ".metadata").unlink()
    assert ".metadata unreadable, never finished?" in composer_problem(folder)


def test_deepspeed_tag_needs_one_optimizer_partition_per_saving_rank(tmp_path):
    tag = tmp_path / "ba8"
    tag.mkdir()
    states = {"dp_world_size": 2, "ds_config": {"zero_optimization": {"stage": 2}}, "module": {"w": torch.ones(3)}}
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    for rank in (0, 1):
        torch.save({"partition": torch.ones(3)}, tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    assert deepspeed_problem(tag) is None
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()  # rank 1 was killed before it wrote
    assert deepspeed_problem(tag) == "no optimizer partition of rank(s) [1], never finished?"
    (tmp_path / "latest").write_text("ba8")
    recovery = recover(deepspeed_folder(tmp_path))
    assert recovery.resume_from is None and not (tmp_path / "latest").exists()
    assert (tmp_path / "corrupt" / "ba8" / "mp_rank_00_model_states.pt").exists()
