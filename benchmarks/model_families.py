"""The two model families side by side: masked discrete DiT vs latent (VAE + latent DiT), same data, same cells.

For each data set (the demo data as ``make demo`` builds it, 4,000 cells; mouse10k, the real 10x data in
../shared/data/mouse10k converted as benchmarks/real_data.py does) this trains the masked DiT
(yamls/demo_cpu.yaml, ``--batches``) and the latent family (yamls/latent_vae_demo_cpu.yaml for
``--vae-batches``, then yamls/latent_dit_demo_cpu.yaml for ``--dit-batches``: the same number of batches of 32
cells in total by default), exports both with ``ddsc export``, loads them with ``Predictor.from_pretrained``,
and scores them on the same held-out (valid split) cells with the code of ``ddsc evaluate`` (``ddsc.eval``:
every family behind the same ``CellModel`` interface, ``ddsc.eval.cell_models``), with smaller budgets. One
table per data set, and everything as JSON (``--work``/model_families.json).

Generation: ``ddsc evaluate``'s generation section for each family (``ddsc.eval.generation``: the held-out
cells split into halves A and B, cells generated on B's gene panels with B's labels, dense bin vectors over the
1,000 genes most often present, distances in a PCA-50 fitted on train cells, next to the B-vs-A reference), in
the data's own bin space. Why bins and not counts: the masked model emits per-cell quantile bins, which do not
determine counts, while the latent model's counts bin exactly as real cells bin (``ddsc.eval.latent_cells``),
so bin space is the one space both reach without inventing anything. Generated cells share B's panels, so the
per-gene zero-fraction correlation reflects the panels only; the per-gene mean correlation, MMD, energy
distance and the kNN AUC do not.

Also scored on the same cells, on ``ddsc evaluate``'s fixed masks at rates 0.15 and 0.5: the masked-bin CE of
the masked DiT (next to the best of ``ddsc evaluate``'s bin baselines) and the imputed-count Pearson (log1p)
of both families next to the best count baseline (every bin baseline's implied count, per-gene mean, kNN mean); NB NLL per gene of the VAE (decoding the posterior
mean; decoding the prior mean z = 0 as the no-information reference); embeddings (demo only: mouse10k has no
labels) by kNN accuracy and k-means ARI per label column (masked: X_ddsc_labels; latent: X_ddsc_latent; and
PCA-50 of log1p counts); on the demo, the known drug effects by ``ddsc.eval.ground_truth`` for both (masked:
expected-bin deltas; latent: decoded log-mean deltas over 32 flow draws; against the true log-rate effects,
Pearson over genes, mean over (cell line, drug, dose) groups, next to the real held-out cells). Wall times of
every stage and parameter counts.

Example: python benchmarks/model_families.py --work /tmp/ddsc_model_families
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
T0 = time.perf_counter()


def stage(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {message}", flush=True)


def prepare_demo(work: Path, cells: int) -> Path:
    """The demo data exactly as ``make demo`` builds it (make_demo_data.py, then tahoe_to_mds.py)."""
    mds, tahoe = work / "mds", work / "tahoe"
    if not (mds / "summary.json").is_file():
        run = [sys.executable, "data_prep/make_demo_data.py", "--out", str(tahoe), "--cells", str(cells)]
        subprocess.run(run, check=True, cwd=ROOT)
        convert = [sys.executable, "data_prep/tahoe_to_mds.py", "--input", str(tahoe / "data")]
        convert += ["--gene-metadata", str(tahoe / "gene_metadata.parquet")]
        convert += ["--sample-metadata", str(tahoe / "sample_metadata.parquet")]
        subprocess.run([*convert, "--out", str(mds), "--valid-fraction", "0.1"], check=True, cwd=ROOT)
    return mds


def train_stage(yaml: str, mds: Path, save: Path, batches: int, args, extra: list[str]) -> dict:
    """One training run in this process (``ddsc.train.trainer.train``); reused when its checkpoint exists."""
    from ddsc.config import load_config
    from ddsc.data.vocab import GeneVocab
    from ddsc.train.config import RunConfig
    from ddsc.train.trainer import check_data, train

    record = save / "benchmark_stage.json"
    if record.is_file() and (save / "latest-rank0.pt").exists():
        return json.loads(record.read_text())
    overrides = [
        f"data.streams.demo.remote={mds}",
        f"model.gene_vocab_size={len(GeneVocab.from_json(mds / 'vocab.json'))}",
        f"trainer.max_duration={batches}ba",
        f"trainer.save_folder={save}",
        "trainer.autoresume=false",
        f"trainer.save_interval={batches}ba",
        f"trainer.eval_interval={batches}ba",
        "trainer.progress_bar=false",
        f"trainer.console_log_interval={max(batches // 4, 1)}ba",
        f"trainer.seed={args.seed}",
        "data.num_workers=0",
        "parallelism.strategy=none",
        *extra,
    ]
    config = load_config(RunConfig, ROOT / "yamls" / yaml, overrides)
    check_data(config)
    start = time.perf_counter()
    summary = train(config)
    result = {"wall_s": time.perf_counter() - start, "batches": summary.batches, "metrics": summary.metrics}
    record.write_text(json.dumps(result))
    return result


def train_and_export(name: str, mds: Path, work: Path, args, conditions: list[str]) -> dict:
    from ddsc.train.export import export_checkpoint

    runs = {}
    stage(f"{name}: training the masked DiT ({args.batches} batches)")
    runs["masked"] = train_stage("demo_cpu.yaml", mds, work / "masked", args.batches, args, conditions)
    stage(f"{name}: training the VAE ({args.vae_batches} batches)")
    runs["vae"] = train_stage("latent_vae_demo_cpu.yaml", mds, work / "vae", args.vae_batches, args, conditions)
    stage(f"{name}: training the latent DiT ({args.dit_batches} batches)")
    dit_extra = [*conditions, f"latent_dit.vae={work / 'vae'}"]
    runs["latent_dit"] = train_stage(
        "latent_dit_demo_cpu.yaml", mds, work / "latent_dit", args.dit_batches, args, dit_extra
    )
    stage(f"{name}: exporting both (ddsc export)")
    for family, save in (("masked", "masked"), ("latent", "latent_dit")):
        summary = export_checkpoint(work / save, work / f"hf_{family}")
        runs[f"export_{family}"] = summary.format()
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ddsc_model_families"))
    parser.add_argument("--mouse10k", type=Path, default=ROOT.parent / "shared" / "data" / "mouse10k")
    parser.add_argument("--datasets", default="demo,mouse10k", help="comma-separated: demo, mouse10k")
    parser.add_argument("--demo-cells", type=int, default=4000)
    parser.add_argument("--batches", type=int, default=300, help="masked DiT training batches of 32 cells")
    parser.add_argument("--vae-batches", type=int, default=200, help="latent family, stage 1")
    parser.add_argument("--dit-batches", type=int, default=100, help="latent family, stage 2")
    parser.add_argument("--eval-cells", type=int, default=400, help="held-out cells scored (valid split)")
    parser.add_argument("--fit-cells", type=int, default=1000, help="train cells for the PCA and baselines")
    parser.add_argument("--gen-cells", type=int, default=128, help="cells per half in the generation metrics")
    parser.add_argument("--embed-cells", type=int, default=100, help="cells embedded (demo)")
    parser.add_argument("--truth-cells", type=int, default=4, help="control cells per line for the drug effects")
    parser.add_argument("--score-threads", type=int, default=1, help="torch threads while scoring")
    parser.add_argument("--masked-steps", type=int, default=16, help="masked sampler steps (first_hitting)")
    parser.add_argument("--latent-steps", type=int, default=50, help="latent Euler steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from family_scores import print_table, score_dataset
    from real_data import prepare as prepare_mouse

    load = os.getloadavg()[0]
    results = {}
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        work = args.work / name
        work.mkdir(parents=True, exist_ok=True)
        stage(f"{name}: preparing the MDS data")
        if name == "demo":
            mds, conditions = prepare_demo(work, args.demo_cells), []
        elif name == "mouse10k":
            mds, conditions = prepare_mouse(args.mouse10k, work, args.seed), ["model.conditions=[]"]
        else:
            raise SystemExit(f"unknown data set {name!r} (demo, mouse10k)")
        runs = train_and_export(name, mds, work, args, conditions)
        stage(f"{name}: scoring both families on the same held-out cells")
        scores = score_dataset(name, mds, work / "hf_masked", work / "hf_latent", args, stage)
        results[name] = {"runs": runs, "scores": scores}
        print_table(name, results[name], args)
        (args.work / "model_families.json").write_text(json.dumps(results, indent=1, default=float))
    stage(
        f"done; JSON: {args.work / 'model_families.json'}; 1-minute load average {load:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
