"""GPU check: run the production training path on this GPU for a few steps per engine, before a long job.

Usage: ``python benchmarks/gpu_check.py [--workdir DIR] [--steps 30]`` (or ``make gpu-check``), on one GPU.

What it does, in about 5-6 minutes on one H100/H200 (most of it process start-up and compilation):
1. Writes 4,000 Tahoe-format demo cells (``data_prep/make_demo_data.py``, ~1,070 genes per cell, so the 1,024-gene
   window is full) and converts them to MDS (``data_prep/tahoe_to_mds.py``), in ``--workdir`` (re-used).
2. Trains ``yamls/dit_1024.yaml`` (the DDSC-size DiT, 177M parameters, 1,025 positions per cell) for ``--steps``
   steps of 64 cells through ``launch/train.py``, once per path: Composer without sharding ("ddp"; one GPU, so
   no DDP wrapper), Composer FSDP2, the DeepSpeed engine with ZeRO-2 (``yamls/dit_1024_deepspeed.yaml``), all in
   bf16, plus Composer in fp32 (TF32 matmuls) as the precision reference; then the xl preset (1.04B) under
   FSDP2 with activation checkpointing, 16 cells per step.
3. Reports per run: loss (mean of the first and last 5 steps), cells/s and positions/s over the last 10 steps,
   MFU against the GPU's bf16 datasheet peak (Composer's table; a run's own MFU log), peak allocated memory.
4. Attention at B=64, H=12, L=1024/1025, d_head=64, bf16: which SDPA backend the DiT's call gets (profiled)
   and the forward+backward time of each backend forced with ``sdpa_kernel`` (flash, memory-efficient,
   cuDNN), of the masked reference and of compiled FlexAttention with a padding block mask; then the
   DDSC-size training step with compiled blocks against eager.

Checks (exit status 1 if any fails): every run finishes with finite losses that fall over the run, and the
bf16 loss after the last steps is within 2% of the fp32 one. Without a CUDA GPU it exits 2 at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CELLS = 4000
WINDOW = 5  # steps averaged at the start and at the end of a run
METRIC_LINE = re.compile(r"^\[metric\]\[batch=(\d+)\]: (\S+): (\S+)")


@dataclass
class Run:
    name: str
    yaml: str
    overrides: list[str]
    cells_per_step: int = 64
    positions_per_cell: int = 1025
    log: dict[int, dict[str, float]] = field(default_factory=dict)
    wall_s: float = 0.0
    error: str = ""

    def series(self, *keys: str) -> list[float]:
        """The first of ``keys`` logged at each batch, in batch order."""
        out = []
        for batch in sorted(self.log):
            for key in keys:
                if key in self.log[batch]:
                    out.append(self.log[batch][key])
                    break
        return out

    def last(self, *keys: str) -> float:
        values = self.series(*keys)
        return values[-1] if values else math.nan


def runs(steps: int) -> list[Run]:
    small = ["trainer.global_train_batch_size=64", "trainer.device_train_microbatch_size=64"]
    return [
        Run("ddp_bf16", "dit_1024.yaml", [*small, "parallelism.strategy=ddp", "trainer.precision=amp_bf16"]),
        Run("ddp_fp32", "dit_1024.yaml", [*small, "parallelism.strategy=ddp", "trainer.precision=fp32"]),
        Run("fsdp2_bf16", "dit_1024.yaml", [*small, "parallelism.strategy=fsdp", "trainer.precision=amp_bf16"]),
        Run(
            "zero2_bf16", "dit_1024_deepspeed.yaml", [*small, "parallelism.zero_stage=2", "trainer.precision=amp_bf16"]
        ),
        Run(
            "xl_fsdp2_ac_bf16",
            "dit_1024_xl.yaml",
            [
                "trainer.global_train_batch_size=16",
                "trainer.device_train_microbatch_size=16",
                "parallelism.strategy=fsdp",
                "parallelism.replicate_degree=1",
                "parallelism.activation_checkpointing=true",
                "trainer.precision=amp_bf16",
            ],
            cells_per_step=16,
        ),
    ]


def prepare_data(workdir: Path) -> Path:
    mds = workdir / "mds"
    if (mds / "train" / "index.json").is_file():
        return mds
    tahoe = workdir / "tahoe"
    py = sys.executable
    subprocess.run(
        [py, str(ROOT / "data_prep" / "make_demo_data.py"), "--out", str(tahoe), "--cells", str(CELLS)], check=True
    )
    convert = [py, str(ROOT / "data_prep" / "tahoe_to_mds.py"), "--input", str(tahoe / "data"), "--out", str(mds)]
    convert += ["--gene-metadata", str(tahoe / "gene_metadata.parquet"), "--valid-fraction", "0.1"]
    convert += ["--sample-metadata", str(tahoe / "sample_metadata.parquet"), "--workers", "4"]
    subprocess.run(convert, check=True)
    return mds


def train(run: Run, mds: Path, workdir: Path, steps: int, port: int) -> None:
    log = workdir / f"{run.name}.log"
    log.unlink(missing_ok=True)
    overrides = [
        f"data.streams.tahoe.remote={mds}",
        "data.streams.tahoe.local=null",  # read the MDS folder in place
        "data.cache_limit=null",
        "data.eval_split=null",
        f"trainer.max_duration={steps}ba",
        "scheduler.t_warmup=10ba",  # the production 2,000-batch warmup would keep the LR near 0 for the check
        "trainer.save_folder=null",
        "trainer.autoresume=false",
        "trainer.wandb_project=null",
        f"trainer.log_file={log}",
        "trainer.console_log_interval=1ba",
        "trainer.log_to_console=false",
        "trainer.progress_bar=false",
        *run.overrides,
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={port}"]
    cmd += [str(ROOT / "launch" / "train.py"), str(ROOT / "yamls" / run.yaml), *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    run.wall_s = time.perf_counter() - start
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        run.error = next((ln for ln in reversed(lines) if re.search(r"Error|error:", ln)), lines[-1]).strip()
        (workdir / f"{run.name}.stderr").write_text(done.stderr)
        return
    run.log = read_log(log)


def read_log(path: Path) -> dict[int, dict[str, float]]:
    """Per-batch metrics from either engine's log file: Composer's FileLogger lines or the DeepSpeed JSON lines."""
    log: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            log.setdefault(int(entry.pop("batch")), {}).update({k: float(v) for k, v in entry.items()})
        elif match := METRIC_LINE.match(line):
            try:
                log.setdefault(int(match[1]), {})[match[2]] = float(match[3])
            except ValueError:
                continue
    return log


def cuda_ms(fn, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` on the GPU (CUDA events), after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def attention_backends() -> list[str]:
    """Which SDPA backend the DiT's call gets, and forward+backward time of each backend forced at B=64, H=12,
    d_head=64, bf16, for L=1024 and 1025 (a cell of 1,024 genes + <cls>)."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)
    return [line for length in (1024, 1025) for line in _backends_at(length, flex)]


def _backends_at(length: int, flex) -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.profiler import ProfilerActivity, profile

    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = (
        torch.randn(64, 12, length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    key_mask = torch.ones(64, 1, 1, length, dtype=torch.bool, device="cuda")
    picked = re.compile(
        r"aten::_scaled_dot_product_(flash|efficient|cudnn)_attention|aten::_scaled_dot_product_attention_math"
    )
    lines = []
    for label, mask in (("no padding (no mask, as the model passes it)", None), ("masked reference", key_mask)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sdpa(q, k, v, attn_mask=mask)
            torch.cuda.synchronize()
        ops = [m for e in prof.key_averages() if (m := picked.search(e.key))]
        lines.append(f"L={length} {label}: SDPA picks {(ops[0][1] or 'math') if ops else 'unknown'}")

    def forced(backend):
        def call():
            with sdpa_kernel(backend):
                sdpa(q, k, v).sum().backward()

        return call

    lengths = torch.full((64,), length, device="cuda")
    block_mask = create_block_mask(lambda b, h, qi, ki: ki < lengths[b], 64, None, length, length, device="cuda")
    candidates = {
        "flash": forced(SDPBackend.FLASH_ATTENTION),
        "memory-efficient": forced(SDPBackend.EFFICIENT_ATTENTION),
        "cudnn": forced(SDPBackend.CUDNN_ATTENTION),
        "masked reference (bool mask)": lambda: sdpa(q, k, v, attn_mask=key_mask).sum().backward(),
        "flex (compiled, padding block mask)": lambda: flex(q, k, v, block_mask=block_mask).sum().backward(),
    }
    for name, fn in candidates.items():
        try:
            lines.append(f"L={length} {name}: {cuda_ms(fn):.2f} ms forward+backward")
        except RuntimeError as err:
            lines.append(f"L={length} {name}: unavailable ({str(err).splitlines()[0][:70]})")
    return lines


def compiled_vs_eager(steps: int = 10) -> str:
    """Steps/s of the DDSC-size DiT's training step (bf16 autocast, 16 cells x 1,025) with compiled blocks / eager."""
    from ddsc.diffusion.config import DiffusionConfig
    from ddsc.diffusion.masked_diffusion import MaskedDiffusion
    from ddsc.model.config import ModelConfig
    from ddsc.model.dit import DiT

    batch = {
        "gene_ids": torch.randint(3, 62_710, (16, 1025), device="cuda"),
        "expr": torch.randint(0, 51, (16, 1025), device="cuda"),
        "attention_mask": torch.ones(16, 1025, dtype=torch.bool, device="cuda"),
    }
    batch["real"] = batch["attention_mask"].clone()
    batch["real"][:, 0] = False
    diffusion, times = MaskedDiffusion(DiffusionConfig(), 51), {}
    for label in ("eager", "compiled"):
        torch.manual_seed(0)
        model = DiT(ModelConfig.from_preset("ddsc", num_bins=51)).cuda().train()
        if label == "compiled":
            model.compile_blocks()

        def step(model=model):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                diffusion.loss(model, batch).loss.backward()

        times[label] = cuda_ms(step, steps)
    return f"compiled / eager DiT step (ddsc size, 16 x 1,025, bf16): {times['eager'] / times['compiled']:.2f}x ({times['eager']:.0f} vs {times['compiled']:.0f} ms)"


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def report(results: list[Run]) -> list[str]:
    """Print the table; return the failed checks."""
    failures = []
    header = f"{'run':18} {'loss first->last':>18} {'cells/s':>9} {'positions/s':>12} {'MFU':>6} {'peak GB':>8} {'wall s':>7}"
    # MFU: model FLOPs (DiT.flops_per_token) per second / the datasheet peak of the run's precision.
    print(header)
    print("-" * len(header))
    for run in results:
        losses = run.series("loss/train/total", "train/nelbo")
        if run.error or len(losses) < 2 * WINDOW:
            failures.append(f"{run.name}: {run.error or f'only {len(losses)} losses logged'}")
            print(f"{run.name:18} FAILED: {run.error or 'no losses logged'}")
            continue
        first, last = mean(losses[:WINDOW]), mean(losses[-WINDOW:])
        if not all(math.isfinite(x) for x in losses):
            failures.append(f"{run.name}: non-finite loss")
        if not last < first:
            failures.append(f"{run.name}: loss did not fall ({first:.4f} -> {last:.4f})")
        cells = run.last("throughput/samples_per_sec")
        mfu = run.last("throughput/device/mfu")
        memory = run.last("memory/peak_allocated_mem")
        print(
            f"{run.name:18} {first:8.4f} -> {last:7.4f} {cells:9.1f} {cells * run.positions_per_cell:12.0f} "
            f"{mfu:6.1%} {memory:8.1f} {run.wall_s:7.0f}"
        )
    by_name = {run.name: run for run in results}
    bf16, fp32 = (mean(by_name[n].series("loss/train/total")[-WINDOW:]) for n in ("ddp_bf16", "ddp_fp32"))
    gap = abs(bf16 - fp32) / fp32 if fp32 else math.nan
    print(
        f"\nbf16 vs fp32 loss over the last {WINDOW} steps (same data, noise and init): {bf16:.4f} vs {fp32:.4f}, gap {gap:.2%}"
    )
    if not gap <= 0.02:
        failures.append(f"bf16 loss {bf16:.4f} is not within 2% of fp32 {fp32:.4f}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("gpu_check_run"), help="data and logs (re-used)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if args.steps < 2 * WINDOW:
        parser.error(f"--steps must be at least {2 * WINDOW}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    print(f"gpu_check on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    args.workdir.mkdir(parents=True, exist_ok=True)
    mds = prepare_data(args.workdir)
    results = runs(args.steps)
    for i, run in enumerate(results):
        print(f"[{i + 1}/{len(results)}] {run.name} ...", flush=True)
        train(run, mds, args.workdir, args.steps, port=29900 + i)
    print()
    failures = report(results)
    print("\nAttention (B=64, H=12, d_head=64, bf16):")
    for line in attention_backends():
        print(f"  {line}")
    print("\n" + compiled_vs_eager())
    for failure in failures:
        print(f"FAILED: {failure}")
    print("gpu_check: " + ("all checks passed" if not failures else f"{len(failures)} check(s) failed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
