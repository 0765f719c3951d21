"""Single-process training on MDS: metrics, checkpoints, resolved config; kill -9, corrupt checkpoints, re-runs."""

from __future__ import annotations

import importlib.util
import math
import os
import random
import shutil
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


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = _weights(a), _weights(b)
    assert first.keys() == second.keys() and len(first) > 10
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name  # bitwise on CPU


EXPORT = ["trainer.hf_export_interval=8ba"]  # the periodic HF export callback (vocab.json beside the data)


@pytest.fixture(scope="module")
def reference(run_dir) -> Path:
    """An uninterrupted 16-batch run (checkpoints every 4 batches, the last 3 kept)."""
    tmp, config = run_dir
    ref = tmp / "ref"
    done = subprocess.run([*TRAIN, str(config), f"trainer.save_folder={ref}", *EXPORT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (ref / "stdout.txt").write_text(done.stdout)
    return ref


def test_train_metrics_resolved_config_and_hf_export(reference):
    metrics = _summary((reference / "stdout.txt").read_text())
    assert set(metrics) >= {f"{s}/{m}" for s in ("train", "eval") for m in ("nelbo", "masked_ce", "masked_acc")}
    assert 0 < metrics["eval/masked_ce"] < 2 * math.log(11)
    assert 0 <= metrics["eval/masked_acc"] <= metrics["eval/masked_acc_pm1"] <= 1
    resolved = yaml.safe_load((reference / "config.yaml").read_text())
    assert resolved["model"]["conditions"][0]["num_labels"] == 3  # filled in from labels.json
    assert resolved["trainer"]["save_folder"] == str(reference)

    ref_weights = _weights(reference)
    assert sorted(p.name for p in (reference / "hf").iterdir()) == ["ba16", "ba8"]
    exported = DDSCModel.from_pretrained(reference / "hf" / "ba16").dit.state_dict()
    assert exported.keys() == {k.removeprefix("model.") for k in ref_weights}
    for name, tensor in ref_weights.items():
        assert torch.equal(exported[name.removeprefix("model.")], tensor), name


@pytest.mark.slow
def test_kill9_at_three_random_points_then_autoresume_matches_uninterrupted(run_dir, reference):
    """Chaos: SIGKILL at 3 seeded random moments (a few ms after a checkpoint file appears: often while it is
    still being written), autoresume each time; the final weights equal the uninterrupted run's."""
    tmp, config = run_dir
    crash = tmp / "crash"
    args = [*TRAIN, str(config), f"trainer.save_folder={crash}", "trainer.save_interval=1ba", *EXPORT]
    rng = random.Random(18)
    for batch in sorted(rng.sample(range(2, 15), 3)):
        log = tmp / f"launch_to_ba{batch}.log"
        with log.open("w") as err:
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while not list(crash.glob(f"ep*-ba{batch}-rank0.pt")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))
        assert proc.poll() is None, f"the launch ended by itself before batch {batch}: {log.read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert not (crash / "ep1-ba16-rank0.pt").exists()  # really killed mid-run
    resumed = subprocess.run(args, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(reference, crash)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(run_dir, reference):
    tmp, config = run_dir
    run = tmp / "truncated"
    shutil.copytree(reference, run, symlinks=True)
    newest = run / "ep1-ba16-rank0.pt"
    truncated = newest.read_bytes()[: newest.stat().st_size // 2]  # as left by a job killed while writing it
    newest.write_bytes(truncated)
    args = [*TRAIN, str(config), f"trainer.save_folder={run}", *EXPORT]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"autoresume: checkpoint {newest} is corrupt: not a complete torch.save zip archive" in done.stderr
    assert f"moved to {run / 'corrupt' / newest.name}" in done.stderr
    assert f"autoresume: resuming from {run / 'ep1-ba12-rank0.pt'}" in done.stderr
    assert (run / "corrupt" / newest.name).read_bytes() == truncated  # kept, not deleted
    _assert_same_weights(reference, run)  # batches 13-16 retrained from the batch-12 checkpoint


@pytest.mark.slow
def test_a_finished_run_relaunched_reports_complete_and_changes_nothing(run_dir, reference):
    tmp, config = run_dir
    before = {p.name: p.stat().st_mtime_ns for p in reference.iterdir()}
    relaunch = [*TRAIN, str(config), f"trainer.save_folder={reference}", *EXPORT, "trainer.precision=auto"]
    done = subprocess.run(relaunch, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    # auto keeps the precision the run was trained with, whatever this CPU's bf16 probe says today
    assert "precision auto: amp_bf16 (kept from the run's first launch)" in done.stdout.splitlines()
    assert done.stdout.splitlines()[-1] == "run already complete: 16 batches (128 cells) trained; nothing to do"
    assert {p.name: p.stat().st_mtime_ns for p in reference.iterdir()} == before


def test_incompatible_resume_and_typos_stop_before_training(run_dir, reference, capsys):
    spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    main = launch.main
    tmp, config = run_dir
    folder = reference
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
    assert "error: data.labels: file:///nonexistent/labels.json not found" in capsys.readouterr().err
