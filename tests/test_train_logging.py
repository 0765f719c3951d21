"""What a run logs: the sampling preview's metrics, W&B (offline) receiving the same values as the file log, and
what the console shows (the progress bar and one line of metrics per interval, nothing per parameter)."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import tiny_config
from train_data import write_mds

from ddsc.config import load_config
from ddsc.diffusion.samplers import sample
from ddsc.model.dit import DiT
from ddsc.train.checkpoints import read_model_state
from ddsc.train.config import RunConfig
from ddsc.train.run import build_loaders, build_preview, resolve_run

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"\[metric\]\[batch=(\d+)\]: (\S+): (\S+)")


def _file_log(path: Path) -> dict[int, dict[str, float]]:
    """Composer FileLogger lines ``[metric][batch=N]: name: value`` (values printed with 4 decimals)."""
    logged: dict[int, dict[str, float]] = {}
    for batch, name, value in LINE.findall(path.read_text()):
        logged.setdefault(int(batch), {})[name] = float(value)
    return logged


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 batches with the preview at batch 4, a file log, W&B in offline mode, the console on, and per-parameter
    optimizer norms every 2 batches."""
    tmp = tmp_path_factory.mktemp("log")
    write_mds(tmp / "mds")
    config = tiny_config(tmp)
    args = [
        f"trainer.save_folder={tmp / 'run'}",
        "trainer.max_duration=4ba",
        "trainer.eval_interval=4ba",
        "trainer.preview_interval=4ba",
        "trainer.preview_cells=6",
        f"trainer.log_file={tmp / 'metrics.log'}",
        "trainer.console_log_interval=1ba",
        "trainer.wandb_project=ddsc-test",
        "trainer.log_to_console=true",
        "trainer.progress_bar=true",
        "trainer.speed_window_size=2",
        "trainer.optimizer_monitor_interval=2",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (tmp / "console.txt").write_text(done.stderr)
    return tmp, load_config(RunConfig, config, args), _file_log(tmp / "metrics.log")


def test_preview_metrics_equal_a_direct_computation(run):
    tmp, config, logged = run
    resolved = resolve_run(config)
    config = resolved.config
    dit = DiT(config.model)
    dit.load_state_dict(read_model_state(tmp / "run" / "ep0-ba4-rank0.pt"))
    _, eval_loader = build_loaders(resolved, world_size=1)
    preview = build_preview(config, eval_loader)
    batch = preview.batch
    assert batch["gene_ids"].shape[0] == 6
    generator = torch.Generator().manual_seed(config.trainer.seed + 4)
    out = sample(dit, batch, method="first_hitting", steps=16, generator=generator, diffusion=config.diffusion)

    real = batch["real"].numpy()
    fake, true = out.expr.numpy()[real], batch["expr"].numpy()[real]
    assert (fake < 11).all() and not np.array_equal(fake, true)
    p = np.histogram(fake, bins=np.arange(12))[0] / fake.size
    q = np.histogram(true, bins=np.arange(12))[0] / true.size
    expected = {
        "preview/mean_bin": fake.mean(),
        "preview/real_mean_bin": true.mean(),
        "preview/bin_tv": 0.5 * np.abs(p - q).sum(),
    }
    assert 0 < expected["preview/bin_tv"] < 1
    for name, value in expected.items():
        assert logged[4][name] == pytest.approx(value, abs=5e-5), name
    assert not any(k.startswith("preview/") for b in (1, 2, 3) for k in logged.get(b, {}))


def _wandb_history(run_file: Path) -> list[dict[str, float]]:
    """The logged rows of an offline ``.wandb`` file, in order.

    wandb 0.31 dropped its Python reader; the file is a LevelDB-style log (a 7-byte ``:W&B`` header, then
    32 KiB blocks of records with a 7-byte ``crc, length, type`` header; types 1 full, 2 first, 3 middle,
    4 last) of protobuf ``Record`` messages, which wandb's own proto module parses.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data, rows, pos, chunk, block = run_file.read_bytes(), [], 7, b"", 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / zero padding
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
            chunk = b""
    return rows


def test_wandb_offline_run_holds_the_logged_values(run):
    tmp, _, logged = run
    (run_file,) = (tmp / "wandb").glob("offline-run-*/run-*.wandb")
    history = _wandb_history(run_file)
    for name in ("loss/train/total", "lr-DecoupledAdamW/group0"):
        ours = [logged[b][name] for b in sorted(logged) if name in logged[b]]
        theirs = [row[name] for row in history if name in row]
        assert len(ours) == 4 and len(set(ours)) > 1, name
        assert theirs == pytest.approx(ours, abs=5e-5), name  # 4 decimals in the file log
    for name in ("preview/bin_tv", "preview/mean_bin", "metrics/eval/masked_ce"):
        (theirs,) = [row[name] for row in history if name in row]
        assert theirs == pytest.approx(logged[4][name], abs=5e-5), name


def test_token_rates_count_real_and_padded_positions(run):
    """Per rank: real tokens (the attention mask) and padded ones (the [B, L] layout), over the same window."""
    tmp, config, logged = run
    for batch in (3, 4):  # a window of 2 batches is full from batch 3 on
        rates = logged[batch]
        real, padded = rates["throughput/device/real_tokens_per_sec"], rates["throughput/device/padded_tokens_per_sec"]
        cells = rates["throughput/device/samples_per_sec"]
        # Cells hold 5-40 genes, cut to max_length 16: per cell 6-17 real positions, batches padded to <= 17.
        # Both callbacks time the window with the trainer's clock: the bounds hold up to the 4 decimals logged.
        assert 0 < real < padded <= 17 * cells * (1 + 1e-5)
        assert 6 * cells * (1 - 1e-5) <= real
    assert 2 not in logged or "throughput/device/real_tokens_per_sec" not in logged[2]


def test_console_shows_the_progress_bar_and_one_metric_line_per_interval_nothing_per_parameter(run):
    tmp, _, logged = run
    console = (tmp / "console.txt").read_text()
    assert "4/4" in console and "ba/s" in console  # Composer's progress bar
    lines = re.findall(r"\[(?:batch=\d+/4|eval at batch=\d+)\][^\n\x1b]*", console)
    assert [line.split("]")[0] + "]" for line in lines] == [
        *(f"[batch={b}/4]" for b in (1, 2, 3, 4)),
        "[eval at batch=4]",
    ]
    metric = r"loss=\S+ train/masked_acc=\S+ train/masked_acc_pm1=\S+ train/masked_ce=\S+ train/nelbo=\S+ lr=\S+"
    for batch, line in enumerate(lines[:4], start=1):
        assert re.fullmatch(rf"\[batch={batch}/4\] {metric}( cells/s=\S+)?", line.strip()), line
        loss = logged[batch - 1]["loss/train/total"]  # the file log counts the batch being trained from 0
        assert float(line.split("loss=")[1].split()[0]) == pytest.approx(loss, abs=1e-3)
    assert "cells/s=" in lines[3]  # throughput once the 2-batch speed window is full (MFU: needs peak_flops)
    assert re.fullmatch(
        r"\[eval at batch=4\] eval/masked_acc=\S+ eval/masked_acc_pm1=\S+ eval/masked_ce=\S+ eval/nelbo=\S+",
        lines[4].strip(),
    )
    assert "l2_norm" not in console and "Train time/" not in console
    per_parameter = [k for k in logged[2] if k.startswith("l2_norm/grad/")]
    assert len(per_parameter) > 10 and all(k in logged[4] for k in per_parameter)  # in the log file, every 2 batches
    assert not any(k.startswith("l2_norm/") for k in logged[1])
