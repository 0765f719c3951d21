"""Real-data check on mouse10k: train a small CPU model for a bounded number of batches, then evaluate it.

Pipeline, all through the public entry points (each step reuses its output in --work when present): gene
vocab and MDS splits by cell (data_prep/build_vocab.py, data_prep/anndata_to_mds.py), training
(launch/train.py on yamls/demo_cpu.yaml with the overrides below; the bound is --batches: the default 1,000
trained in 166 s on 2 CPU cores at load average 1-2, 827 s at 2-5; 200 batches lose to the gene x cell
product baseline), ``ddsc export`` (checkpoint -> HF folder), ``ddsc evaluate`` on the test split with
the baselines fitted on train.
Prints the data set it ran on and, per mask rate, the model's masked CE beside every baseline's (per-gene
marginal, kNN, cell histogram, gene x cell product), all measured in the same run on the same masks, the
best baseline, the margin over it with its 95% bootstrap interval and the ratio (< 1 = model better); exits 1
unless the model beats every baseline at every rate. The full report (metrics.json, plots, summary.md) is
written to --work/report.

Example: python benchmarks/real_data.py --work /tmp/ddsc_real_data   (220 s end to end at load average 1-2; 930 s at 2-5)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DDSC = [sys.executable, "-m", "ddsc.cli"]  # the `ddsc` console command of this interpreter


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def prepare(data: Path, work: Path, seed: int) -> Path:
    mds = work / "mds"
    if not (mds / "summary.json").is_file():
        vocab = work / "vocab.json"
        _run([sys.executable, "data_prep/build_vocab.py", "--features", str(data), "--out", str(vocab)])
        _run(
            [
                sys.executable,
                "data_prep/anndata_to_mds.py",
                "--input",
                str(data),
                "--vocab",
                str(vocab),
                "--out",
                str(mds),
                "--valid-fraction",
                "0.1",
                "--test-fraction",
                "0.1",
                "--split-seed",
                str(seed),
            ]
        )
    return mds


def train(mds: Path, work: Path, args: argparse.Namespace) -> Path:
    ckpt = work / "checkpoints"
    if not (ckpt / "latest-rank0.pt").exists():
        overrides = [
            f"data.streams.demo.remote={mds}",
            "model.conditions=[]",
            f"model.d_model={args.d_model}",
            f"model.n_layers={args.n_layers}",
            f"model.n_heads={args.n_heads}",
            f"trainer.max_duration={args.batches}ba",
            f"trainer.save_folder={ckpt}",
            "trainer.autoresume=false",
            f"trainer.save_interval={args.batches}ba",
            f"trainer.eval_interval={args.batches}ba",
            "trainer.global_train_batch_size=64",
            "trainer.device_train_microbatch_size=64",
            "parallelism.strategy=none",
            "trainer.progress_bar=false",
            f"trainer.seed={args.seed}",
            "data.num_workers=0",
            *args.overrides,
        ]
        _run([sys.executable, "launch/train.py", "yamls/demo_cpu.yaml", *overrides])
    return ckpt


def export(ckpt: Path, work: Path) -> Path:
    """The trained checkpoint as a Hugging Face folder, through the public ``ddsc export``."""
    hf = work / "hf"
    if not (hf / "model.safetensors").is_file():
        _run([*DDSC, "export", "--checkpoint", str(ckpt / "latest-rank0.pt"), "--out", str(hf)])
    return hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mouse10k")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ddsc_real_data"))
    parser.add_argument("--batches", type=int, default=1000, help="training batches of 64 cells (the time bound)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--max-cells", type=int, default=1000, help="test cells evaluated")
    parser.add_argument("--generate-cells", type=int, default=128, help="cells generated per half (0 skips)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="extra training overrides, e.g. data.binning.num_bins=16")
    args = parser.parse_args(argv)

    start, load = time.perf_counter(), os.getloadavg()[0]
    args.work.mkdir(parents=True, exist_ok=True)
    mds = prepare(args.data, args.work, args.seed)
    model = export(train(mds, args.work, args), args.work)
    report = args.work / "report"
    _run(
        [
            *DDSC,
            "evaluate",
            "--model",
            str(model),
            "--data",
            str(mds),
            "--split",
            "test",
            "--out",
            str(report),
            "--max-cells",
            str(args.max_cells),
            "--max-train-cells",
            "10000",
            "--generate-cells",
            str(args.generate_cells),
            "--seed",
            str(args.seed),
        ]
    )
    metrics = json.loads((report / "metrics.json").read_text())
    beaten = print_table(metrics, args)
    print(
        f"end to end {time.perf_counter() - start:.0f} s (steps found in --work are reused); 1-minute load average "
        f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs"
    )
    return 0 if beaten else 1


BASELINES = ("marginal", "knn", "cell_histogram", "gene_cell_product")


def print_table(metrics: dict, args: argparse.Namespace) -> bool:
    """Print the model's masked CE against every baseline per mask rate; True when it beats all of them."""
    setup = metrics["setup"]
    print(
        f"\n{args.data.name} ({args.data}), {args.batches} training batches, {setup['eval_cells']} test cells, "
        f"baselines fitted on {setup['baseline_train_cells']} train cells; masked CE in nats, margin = best "
        "baseline CE - model CE with its 95% bootstrap interval over cells"
    )
    print("mask rate | model | " + " | ".join(BASELINES) + " | best baseline | margin [95% CI] | model/best")
    beaten = True
    for rate, m in metrics["masked"].items():
        margin = metrics["margins"][rate]
        best, (low, high) = margin["best_baseline"], margin["vs_best_ci95"]
        print(
            f"{rate:>9} | {m['model']['masked_ce']:.4f} | "
            + " | ".join(f"{m[b]['masked_ce']:.4f}" for b in BASELINES)
            + f" | {best} | {margin['vs_best']:+.4f} [{low:+.4f}, {high:+.4f}] | "
            f"{m['model']['masked_ce'] / m[best]['masked_ce']:.3f}"
        )
        beaten &= all(m["model"]["masked_ce"] < m[b]["masked_ce"] for b in BASELINES)
    print(f"model beats every baseline at every mask rate: {beaten}; report: {args.work / 'report' / 'summary.md'}")
    return beaten


if __name__ == "__main__":
    sys.exit(main())
