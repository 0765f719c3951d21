"""Real-data check on mouse10k: train a small CPU model for a bounded number of batches, then evaluate it.

Pipeline, all through the public entry points (each step reuses its output in --work when present): gene
vocab and MDS splits by cell (data_prep/build_vocab.py, data_prep/anndata_to_mds.py), training
(launch/train.py on yamls/demo_cpu.yaml with the overrides below; the bound is --batches, about 8 minutes for
the default 200 on 2 shared CPU cores), ``ddsc export`` (checkpoint -> HF folder), ``ddsc evaluate`` on the
test split with the baselines fitted on train.
Prints, per mask rate, the model's masked CE and its ratio to the per-gene marginal and kNN baselines
measured in the same run on the same masks (< 1 = model better), and exits 1 unless the model beats both at
every rate. The full report (metrics.json, plots, summary.md) is written to --work/report.

Example: python benchmarks/real_data.py --work /tmp/ddsc_real_data   (about 10 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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
        from ddsc.data.vocab import GeneVocab

        overrides = [
            f"data.streams.demo.remote={mds}",
            f"model.gene_vocab_size={len(GeneVocab.from_json(mds / 'vocab.json'))}",
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
    parser.add_argument("--batches", type=int, default=200, help="training batches of 64 cells (the time bound)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--max-cells", type=int, default=1000, help="test cells evaluated")
    parser.add_argument("--generate-cells", type=int, default=128, help="cells generated per half (0 skips)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="extra training overrides, e.g. data.binning.num_bins=16")
    args = parser.parse_args(argv)

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
    setup = metrics["setup"]

    print(
        f"\nmouse10k, {args.batches} training batches, {setup['eval_cells']} test cells, "
        f"baselines fitted on {setup['baseline_train_cells']} train cells"
    )
    print("mask rate | model CE | marginal CE | kNN CE | model/marginal | model/kNN")
    beaten = True
    for rate, m in metrics["masked"].items():
        ce = {name: m[name]["masked_ce"] for name in ("model", "marginal", "knn")}
        print(
            f"{rate:>9} | {ce['model']:8.4f} | {ce['marginal']:11.4f} | {ce['knn']:6.4f} | "
            f"{ce['model'] / ce['marginal']:14.3f} | {ce['model'] / ce['knn']:9.3f}"
        )
        beaten &= ce["model"] < min(ce["marginal"], ce["knn"])
    print(f"model beats both baselines at every mask rate: {beaten}; report: {report / 'summary.md'}")
    return 0 if beaten else 1


if __name__ == "__main__":
    sys.exit(main())
