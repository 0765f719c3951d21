"""Two "nodes" on loopback (two Composer launchers, node_rank 0 and 1) train exactly like one node with 2 ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from streaming.base.shared import prefix as shm_prefix
from test_train import tiny_config
from train_data import write_mds

from ddsc.data.streaming import HostShare, _own_shm_prefixes

ROOT = Path(__file__).resolve().parents[1]
COMPOSER = Path(sys.executable).with_name("composer")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _launcher(config: Path, port: int, save_folder: Path, *flags: str) -> subprocess.Popen:
    # No autoresume: Composer 0.32's autoresume has every node's local rank 0 delete one shared signal file in
    # save_folder, which fails when two nodes see the same filesystem folder (see launch/README.md).
    args = [
        f"trainer.save_folder={save_folder}",
        "trainer.autoresume=false",
        "trainer.max_duration=4ba",
        "trainer.save_interval=2ba",
        "data.eval_split=null",
    ]
    cmd = [str(COMPOSER), *flags, "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return subprocess.Popen(
        [*cmd, str(ROOT / "launch" / "train.py"), str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )


def _finish(*procs: subprocess.Popen) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "ep0-ba4-rank0.pt", map_location="cpu", weights_only=False)["state"]["model"]


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
    nodes = [
        _launcher(config, 29762, tmp_path / "two", "--world_size", "2", "--nproc", "1", "--node_rank", str(rank))
        for rank in (0, 1)
    ]
    _finish(*nodes)

    expected, actual = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert expected.keys() == actual.keys() and len(expected) > 10
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name
    initial = torch.load(tmp_path / "one" / "ep0-ba2-rank0.pt", map_location="cpu", weights_only=False)
    assert not all(torch.equal(initial["state"]["model"][k], expected[k]) for k in expected)  # training moved them
