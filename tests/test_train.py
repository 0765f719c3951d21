"""Single-process training on MDS: metrics, checkpoints, resolved config, and kill -9 + autoresume."""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from train_data import write_mds

from ddsc.model.hf import DDSCModel

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "launch" / "train.py")]


def tiny_config(tmp: Path) -> Path:
    """A 2-layer DiT on 64 synthetic cells; 8 batches of 8 cells per epoch."""
    config = {
        "data": {
            "streams": {"synth": {"remote": str(tmp / "mds")}},
            "max_length": 16,  # below most cells (5-40 genes): resumes must redraw the same random gene subsets
            "binning": {"method": "quantile", "num_bins": 11},
            "num_workers": 0,
            "num_canonical_nodes": 1,
        },
        "model": {
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 2,
            "gene_vocab_size": 200,
            "num_bins": 11,
            "conditions": [{"name": "cell_line_id", "dropout": 0.1}, {"name": "drug", "dropout": 0.1}],
        },
        "optimizer": {"lr": 1e-3},
        "scheduler": {"t_warmup": "2ba"},
        "trainer": {
            "run_name": "tiny",
            "max_duration": "16ba",
            "global_train_batch_size": 8,
            "device_train_microbatch_size": 4,
            "device_eval_batch_size": 8,
            "eval_interval": "8ba",
            "save_interval": "4ba",
            "autoresume": True,
            "progress_bar": False,
            "log_to_console": False,
            # Explicit, not "auto" (a per-machine measurement): the CPU bf16 path of each engine, on any CPU.
            "precision": "amp_bf16",
        },
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    write_mds(tmp / "mds")
    return tmp, tiny_config(tmp)


def _summary(stdout: str) -> dict[str, float]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("trained "))
    return {k: float(v) for k, v in (kv.split("=") for kv in line.split(": ", 1)[1].split())}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    latest = folder / "latest-rank0.pt"
    assert latest.resolve().name == "ep1-ba16-rank0.pt"  # 2 epochs of 8 batches
    state = torch.load(latest, map_location="cpu", weights_only=False)
    return state["state"]["model"]


def test_train_then_kill9_and_autoresume_matches_uninterrupted(run_dir):
    tmp, config = run_dir
    ref = tmp / "ref"
    export = ["trainer.hf_export_interval=8ba"]  # the periodic HF export callback (vocab.json beside the data)
    done = subprocess.run([*TRAIN, str(config), f"trainer.save_folder={ref}", *export], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = _summary(done.stdout)
    assert set(metrics) >= {f"{s}/{m}" for s in ("train", "eval") for m in ("nelbo", "masked_ce", "masked_acc")}
    assert 0 < metrics["eval/masked_ce"] < 2 * math.log(11)
    assert 0 <= metrics["eval/masked_acc"] <= metrics["eval/masked_acc_pm1"] <= 1
    resolved = yaml.safe_load((ref / "config.yaml").read_text())
    assert resolved["model"]["conditions"][0]["num_labels"] == 3  # filled in from labels.json
    assert resolved["trainer"]["save_folder"] == str(ref)

    crash = tmp / "crash"
    args = [*TRAIN, str(config), f"trainer.save_folder={crash}", "trainer.save_interval=1ba"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (crash / "ep0-ba3-rank0.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (crash / "ep1-ba16-rank0.pt").exists()  # really killed mid-run
    resumed = subprocess.run(args, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ref_weights, crash_weights = _weights(ref), _weights(crash)
    assert ref_weights.keys() == crash_weights.keys()
    for name, tensor in ref_weights.items():
        assert torch.equal(tensor, crash_weights[name]), name  # bitwise on CPU

    assert sorted(p.name for p in (ref / "hf").iterdir()) == ["ba16", "ba8"]
    exported = DDSCModel.from_pretrained(ref / "hf" / "ba16").dit.state_dict()
    assert exported.keys() == {k.removeprefix("model.") for k in ref_weights}
    for name, tensor in ref_weights.items():
        assert torch.equal(exported[name.removeprefix("model.")], tensor), name


def test_incompatible_resume_and_typos_stop_before_training(run_dir, capsys):
    spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    main = launch.main
    tmp, config = run_dir
    folder = tmp / "ref"
    if not (folder / "config.yaml").exists():
        pytest.skip("needs the run of the previous test")
    assert main([str(config), f"trainer.save_folder={folder}", "model.n_layers=3"]) == 2
    assert "cannot resume: 'model.n_layers' was 2 in the saved run but is 3 now" in capsys.readouterr().err
    assert main([str(config), "model.n_layer=3"]) == 2
    assert "did you mean 'n_layers'" in capsys.readouterr().err
    assert main([str(config), "data.streams.synth.remote=/nonexistent"]) == 2
    assert "data.streams.synth: no MDS split 'train'" in capsys.readouterr().err
    assert main([str(config), f"trainer.save_folder={tmp / 'small_vocab'}", "model.gene_vocab_size=50"]) == 2
    assert "model.gene_vocab_size=50 is smaller than the gene vocabulary" in capsys.readouterr().err
    missing = "file:///nonexistent/labels.json"
    assert main([str(config), f"data.labels={missing}"]) == 2
    assert (
        "data.labels: file:///nonexistent/labels.json is remote; set data.streams.synth.local"
        in capsys.readouterr().err
    )
    cache = f"data.streams.synth.local={tmp / 'cache'}"
    assert main([str(config), f"data.labels={missing}", cache, f"trainer.save_folder={tmp / 'remote'}"]) == 2
    assert "config error: data.labels: file:///nonexistent/labels.json not found" in capsys.readouterr().err
