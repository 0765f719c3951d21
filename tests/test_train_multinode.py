"""Two "nodes" on loopback (two Composer launchers, node_rank 0 and 1) train exactly like one node with 2 ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from streaming.base.shared import prefix as shm_prefix
from test_train import tiny_config
from train_data import write_mds

from ddsc.data.streaming import HostShare, _own_shm_prefixes
from ddsc.train.checkpoints import read_model_state

ROOT = Path(__file__).resolve().parents[1]
COMPOSER = Path(sys.executable).with_name("composer")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _launcher(
    config: Path, port: int, save_folder: Path, *flags: str, overrides: tuple[str, ...] = (), batches: int = 4
) -> subprocess.Popen:
    """One Composer launcher (a "node"), in its own process group so that a test can kill -9 the whole node.

    Autoresume is on and both nodes share one filesystem save folder, as on SLURM with NFS/Lustre/GPFS.
    """
    args = [
        f"trainer.save_folder={save_folder}",
        "trainer.autoresume=true",
        f"trainer.max_duration={batches}ba",
        "trainer.save_interval=2ba",
        "data.eval_split=null",
        *overrides,
    ]
    cmd = [str(COMPOSER), *flags, "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return subprocess.Popen(
        [*cmd, str(ROOT / "launch" / "train.py"), str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        start_new_session=True,
    )


def _two_nodes(config: Path, port: int, save_folder: Path, *overrides: str, batches: int = 4) -> list[subprocess.Popen]:
    flags = ("--world_size", "2", "--nproc", "1")
    return [
        _launcher(config, port, save_folder, *flags, "--node_rank", str(r), overrides=overrides, batches=batches)
        for r in (0, 1)
    ]


def _finish(*procs: subprocess.Popen) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]


def _weights(folder: Path, batch: int = 4) -> dict[str, torch.Tensor]:
    path = folder / f"ep{(batch - 1) // 8}-ba{batch}-rank0.pt"  # 8 batches per epoch
    return torch.load(path, map_location="cpu", weights_only=False)["state"]["model"]


def _kill(proc: subprocess.Popen) -> None:
    """kill -9 a node: its launcher and every training process it started."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def test_nodes_on_one_host_take_their_own_shm_prefixes():
    assert list(zip(range(3), shm_prefix._each_prefix_int(), strict=False)) == [(0, 0), (1, 1), (2, 2)]
    with _own_shm_prefixes(HostShare(index=1, count=3)):
        first = [p for _, p in zip(range(3), shm_prefix._each_prefix_int(), strict=False)]
    assert first == [1, 4, 7]
    assert next(shm_prefix._each_prefix_int()) == 0  # restored


@pytest.mark.slow
def test_two_loopback_nodes_match_one_node_with_two_ranks(tmp_path):
    write_mds(tmp_path / "mds")
    config = tiny_config(tmp_path)
    one_node = _launcher(config, 29761, tmp_path / "one", "-n", "2")
    _finish(one_node)
    _finish(*_two_nodes(config, 29762, tmp_path / "two"))

    expected, actual = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert expected.keys() == actual.keys() and len(expected) > 10
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name
    initial = torch.load(tmp_path / "one" / "ep0-ba2-rank0.pt", map_location="cpu", weights_only=False)
    assert not all(torch.equal(initial["state"]["model"][k], expected[k]) for k in expected)  # training moved them


def _resumable_state(folder: Path, engine: str) -> dict[str, torch.Tensor]:
    """The weights of the batch-8 checkpoint in ``folder``, or {} while it is not written."""
    if engine == "composer":
        return _weights(folder, 8) if (folder / "ep0-ba8-rank0.pt").exists() else {}
    latest = folder / "latest"
    return read_model_state(folder) if latest.is_file() and latest.read_text() == "ba8" else {}


def _checkpoint_at_4(folder: Path, engine: str) -> bool:
    if engine == "composer":
        return (folder / "ep0-ba4-rank0.pt").exists()
    return (folder / "latest").is_file() and (folder / "latest").read_text() == "ba4"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "killed"), [("composer", "both nodes"), ("composer", "node 1 only"), ("deepspeed", "both nodes")]
)
def test_shared_save_folder_autoresume_after_kill9(tmp_path, engine, killed):
    """Two nodes, one POSIX save folder, autoresume on: kill -9 mid-run (both nodes, or node 1 alone, after which
    node 0 fails on its own), relaunch both: the same final weights as an uninterrupted 2-node run, bitwise."""
    write_mds(tmp_path / "mds")
    config = tiny_config(tmp_path)
    extra = ("parallelism.engine=deepspeed",) if engine == "deepspeed" else ()
    _finish(*_two_nodes(config, 29763, tmp_path / "ref", *extra, batches=8))

    shared = tmp_path / "shared"
    nodes = _two_nodes(config, 29764, shared, *extra, batches=8)
    deadline = time.monotonic() + 240
    while not _checkpoint_at_4(shared, engine) and time.monotonic() < deadline:
        assert all(node.poll() is None for node in nodes), "a node stopped before the kill"
        time.sleep(0.05)
    for node in nodes if killed == "both nodes" else nodes[1:]:
        _kill(node)
    if killed == "node 1 only":
        out, _ = nodes[0].communicate(timeout=300)  # its peer is gone: node 0 must fail, not hang
        assert nodes[0].returncode != 0, out[-2000:]
    assert not _resumable_state(shared, engine)  # really stopped mid-run
    _finish(*_two_nodes(config, 29765, shared, *extra, batches=8))

    expected, actual = _resumable_state(tmp_path / "ref", engine), _resumable_state(shared, engine)
    assert expected.keys() == actual.keys() and len(expected) > 10
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name
    assert not list(shared.glob("._signal_file*"))
