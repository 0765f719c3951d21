"""Data-parallel scaling of training on CPU: per-rank throughput with 2 ranks against 1 rank, and MFU.

Each run is the real entry point, ``composer -n N launch/train.py yamls/demo_cpu.yaml key=value ...`` (DDP, bf16
autocast on CPU), on the synthetic demo dataset (``data_prep/make_demo_data.py`` -> ``tahoe_to_mds.py``, written
once into the work folder, or ``--data`` for an existing MDS folder). Two model sizes:
  demo      the demo config as it is (d_model 128, 4 layers, 128 genes per cell, 32 cells per rank);
  ddsc      the DDSC-size DiT (``PRESETS["ddsc"]``: d_model 768, 12 layers, 12 heads) with short cells and a
            small batch (``--ddsc-max-length``, ``--ddsc-batch``) so that a step takes seconds on 2 cores.
Weak scaling: every rank keeps the same batch, so the global batch grows with the ranks.

The figures are those Composer's ``SpeedMonitor`` logs to the run's file log (``trainer.log_file``) at the last
batch: its window is set to the timed batches, so the ``--warmup`` batches before it (process start, first
loader fetch, oneDNN kernel selection) are excluded. ``throughput/device/samples_per_sec`` is the per-rank rate;
ratio = per-rank rate with N ranks / per-rank rate with 1 rank (ideal 1.0), speedup = N x ratio (ideal N).
MFU is ``throughput/device/mfu``: model FLOP/s per rank over ``trainer.peak_flops_per_device``, which is set to
the machine's peak (``--peak-flops``, default the YAML's) divided by the ranks, as the ranks share the cores;
so for every row it is the share of the whole machine's peak that the run achieves.

The machine's cores are shared (each rank gets ``cores / N`` threads): with 2 ranks on 2 cores each rank has
one core, so expect the per-rank rate to drop; the load average is printed because other work on the cores
lowers every figure. On a loaded machine a rank with 2 OpenMP threads can be several times slower than with 1
(each parallel region waits for its slowest, preempted thread), which makes the 1-rank reference slow and the
ratio look better than 1: ``--threads 1`` runs every rank single-threaded, the control that separates the two.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ddsc.config import load_config
from ddsc.model.config import PRESETS
from ddsc.train.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
COMPOSER = Path(sys.executable).with_name("composer")
YAML = "yamls/demo_cpu.yaml"
METRIC = re.compile(r"\[metric\]\[batch=(\d+)\]: (\S+): (\S+)")


@dataclass
class Case:
    """One model size: the overrides on top of the YAML, and the batches to warm up and to time."""

    name: str
    overrides: list[str]
    warmup: int
    timed: int


@dataclass
class Result:
    case: str
    ranks: int
    threads: int
    batch_per_rank: int
    per_rank_samples_per_sec: float
    mfu: float
    wall_s: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_data(workdir: Path, cells: int) -> Path:
    """The demo dataset as MDS (``make demo``'s first two steps), reused when the work folder already has it."""
    mds = workdir / "mds"
    if (mds / "train" / "index.json").is_file():
        return mds
    tahoe = workdir / "tahoe"
    steps = [
        ["data_prep/make_demo_data.py", "--out", tahoe, "--cells", cells, "--shards", 1],
        ["data_prep/tahoe_to_mds.py", "--input", tahoe / "data", "--gene-metadata", tahoe / "gene_metadata.parquet"],
    ]
    steps[1] += ["--sample-metadata", tahoe / "sample_metadata.parquet", "--out", mds, "--valid-fraction", 0.01]
    for step in tqdm(steps, desc="demo data", leave=False):
        done = subprocess.run([sys.executable, *map(str, step)], cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"train_scaling: {step[0]} failed:\n{done.stderr[-3000:]}")
    return mds


def last_metrics(log: Path) -> dict[str, float]:
    """The metrics of the last batch in a Composer ``FileLogger`` file (``[metric][batch=N]: name: value``)."""
    if not log.is_file():
        return {}
    rows = METRIC.findall(log.read_text())
    last = max((int(b) for b, _, _ in rows), default=-1)
    return {name: float(value) for b, name, value in rows if int(b) == last}


def run(case: Case, ranks: int, threads: int, batch: int, peak_flops: float, mds: Path, workdir: Path) -> Result:
    """Train ``warmup + timed`` batches with ``ranks`` processes and read the speed monitor's last window."""
    log = workdir / f"{case.name}-{ranks}" / "metrics-rank{rank}.log"
    overrides = [
        *case.overrides,
        f"data.streams.demo.remote={mds}",
        "data.eval_split=null",
        "trainer.save_folder=null",
        "trainer.autoresume=false",
        f"trainer.run_name={case.name}-{ranks}",
        f"trainer.max_duration={case.warmup + case.timed}ba",
        f"trainer.speed_window_size={case.timed}",
        f"trainer.global_train_batch_size={batch * ranks}",
        f"trainer.device_train_microbatch_size={batch}",
        f"trainer.peak_flops_per_device={peak_flops / ranks}",
        f"trainer.log_file={log}",
        "trainer.log_to_console=false",
        "trainer.progress_bar=false",
    ]
    load_config(RunConfig, ROOT / YAML, overrides)  # a bad override stops here, before any process starts
    rank0_log = Path(str(log).replace("{rank}", "0"))
    rank0_log.unlink(missing_ok=True)
    command = [str(COMPOSER), "-n", str(ranks), "--master_port", str(free_port()), "launch/train.py", YAML]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([*command, *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    metrics = last_metrics(rank0_log)
    if done.returncode or "throughput/device/samples_per_sec" not in metrics:
        sys.exit(f"train_scaling: {case.name} with {ranks} ranks failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    return Result(
        case=case.name,
        ranks=ranks,
        threads=threads,
        batch_per_rank=batch,
        per_rank_samples_per_sec=metrics["throughput/device/samples_per_sec"],
        mfu=metrics.get("throughput/device/mfu", float("nan")),
        wall_s=wall,
    )


def print_table(results: list[Result], descriptions: dict[str, str]) -> None:
    header = (
        f"{'config':7s} {'ranks':>5s} {'thr/rank':>8s} {'cells/rank':>10s} {'per-rank cells/s':>16s} "
        f"{'ratio':>6s} {'total cells/s':>13s} {'speedup':>7s} {'MFU':>7s} {'run s':>6s}"
    )
    print(header)
    print("-" * len(header))
    for case in descriptions:
        rows = [r for r in results if r.case == case]
        reference = rows[0]
        for r in rows:
            ratio = r.per_rank_samples_per_sec / reference.per_rank_samples_per_sec
            total = r.per_rank_samples_per_sec * r.ranks
            speedup = total / (reference.per_rank_samples_per_sec * reference.ranks)
            print(
                f"{case:7s} {r.ranks:5d} {r.threads:8d} {r.batch_per_rank:10d} {r.per_rank_samples_per_sec:16.2f} "
                f"{ratio:6.2f} {total:13.2f} {speedup:7.2f} {r.mfu:7.4f} {r.wall_s:6.0f}"
            )
    for case, text in descriptions.items():
        print(f"  {case}: {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=["demo", "ddsc"], default=["demo", "ddsc"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2], help="the first is the reference")
    parser.add_argument("--workdir", type=Path, help="data and logs (default: a temporary folder)")
    parser.add_argument("--data", type=Path, help="an existing MDS folder of the demo data (skips data prep)")
    parser.add_argument("--cells", type=int, default=2000, help="demo cells to generate (default 2000)")
    parser.add_argument("--demo-warmup", type=int, default=3, help="untimed batches (default 3)")
    parser.add_argument("--demo-batches", type=int, default=8, help="timed batches (default 8)")
    parser.add_argument("--demo-batch", type=int, help="cells per rank (default: the YAML's global batch)")
    parser.add_argument("--ddsc-warmup", type=int, default=2, help="untimed batches (default 2)")
    parser.add_argument("--ddsc-batches", type=int, default=3, help="timed batches (default 3)")
    parser.add_argument("--ddsc-batch", type=int, default=2, help="cells per rank (default 2)")
    parser.add_argument("--ddsc-max-length", type=int, default=64, help="genes per cell (default 64)")
    parser.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks)")
    parser.add_argument("--peak-flops", type=float, help="machine peak FLOP/s (default: the YAML's per-device peak)")
    args = parser.parse_args()
    if min(args.ranks) < 1:
        parser.error("--ranks: must be positive")

    base = load_config(RunConfig, ROOT / YAML, ["data.streams.demo.remote=unused"])
    peak = args.peak_flops or base.trainer.peak_flops_per_device
    if not peak:
        parser.error("--peak-flops: the YAML sets no trainer.peak_flops_per_device; pass the machine's peak")
    d_model, n_layers, n_heads = PRESETS["ddsc"]
    ddsc_model = [f"model.d_model={d_model}", f"model.n_layers={n_layers}", f"model.n_heads={n_heads}"]
    m = base.model
    cases = {
        "demo": Case("demo", [], args.demo_warmup, args.demo_batches),
        "ddsc": Case(
            "ddsc", [*ddsc_model, f"data.max_length={args.ddsc_max_length}"], args.ddsc_warmup, args.ddsc_batches
        ),
    }
    batches = {"demo": args.demo_batch or base.trainer.global_train_batch_size, "ddsc": args.ddsc_batch}
    descriptions = {
        "demo": f"d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, {base.data.max_length} genes/cell",
        "ddsc": f"d_model {d_model}, {n_layers} layers, {n_heads} heads, {args.ddsc_max_length} genes/cell",
    }
    descriptions = {name: descriptions[name] for name in args.configs}

    with tempfile.TemporaryDirectory(prefix="train_scaling-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        start, load_before = time.perf_counter(), os.getloadavg()
        mds = args.data.resolve() if args.data else prepare_data(workdir, args.cells)
        results = []
        plan = [(name, n) for name in args.configs for n in args.ranks]
        for name, ranks in (bar := tqdm(plan, desc="training runs")):
            bar.set_postfix_str(f"{name}, {ranks} rank(s)")
            threads = args.threads or max(1, (os.cpu_count() or 1) // ranks)
            results.append(run(cases[name], ranks, threads, batches[name], peak, mds, workdir))
        load_after = os.getloadavg()

    print(
        f"\nDDP on CPU through `composer -n N launch/train.py {YAML}`; {os.cpu_count()} cores shared by the "
        f"ranks; per-rank rates from Composer's SpeedMonitor over the timed batches (warm-up excluded)"
    )
    print_table(results, descriptions)
    print(
        f"ratio = per-rank cells/s / per-rank cells/s with {args.ranks[0]} rank(s) (ideal 1.00); speedup = total "
        f"cells/s ratio (ideal = ranks). MFU = throughput/device/mfu with peak_flops_per_device = {peak:.3g} / ranks."
    )
    print(
        f"load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.1f}' for x in load_after)}; benchmark took {time.perf_counter() - start:.0f}s"
    )


if __name__ == "__main__":
    main()
