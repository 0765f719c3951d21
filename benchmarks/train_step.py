"""Training-step throughput of the DiT on CPU, fp32 vs bf16 autocast, as MFU.

MFU = model FLOP/s (``DiT.flops_per_token`` x tokens per second: 6 x matmul weights per position + attention
12 x layers x d_model x seq_len, forward + backward) divided by the peak bf16 matmul FLOP/s of this machine,
measured in the same run with large square matmuls (best of many, as the step time is best of ``--steps``).
Each step is a full training step: MDLM loss (masking, forward, backward) and an AdamW update (fused by default)
of every parameter, with cells of the production length (1024 genes + <cls>). Target: MFU >= 0.4 with bf16 for
the DDSC-size preset (d_model 768, 12 layers, 12 heads). The time split (forward / backward / optimizer) says
where the rest goes.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

from ddsc.data.tokens import GENE_CLS, ExpressionTokens
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.masked_diffusion import MaskedDiffusion
from ddsc.model.config import ModelConfig
from ddsc.model.dit import DiT


def peak_matmul_flops(dtype: torch.dtype, size: int, seconds: float) -> tuple[float, float]:
    """Peak matmul FLOP/s: best single ``size``^3 matmul in wall time, and the rate per CPU second of all of them.

    The second is the contention-robust figure on a shared machine: time the process is descheduled does not
    count, in the peak as in the training step (rates per CPU second are compared with each other only).
    """
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best, count, cpu_start = 0.0, 0, time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best, count = max(best, 2 * size**3 / (time.perf_counter() - start)), count + 1
    return best, count * 2 * size**3 / (time.process_time() - cpu_start)


def random_batch(batch_size: int, length: int, num_bins: int, gene_vocab_size: int) -> dict[str, torch.Tensor]:
    tokens = ExpressionTokens(num_bins)
    gene_ids = torch.randint(3, gene_vocab_size, (batch_size, length))
    expr = torch.randint(0, num_bins, (batch_size, length))
    gene_ids[:, 0], expr[:, 0] = GENE_CLS, tokens.cls
    real = torch.ones(batch_size, length, dtype=torch.bool)
    real[:, 0] = False
    return {"gene_ids": gene_ids, "expr": expr, "real": real, "attention_mask": torch.ones_like(real)}


def step_seconds(preset: str, bf16: bool, args: argparse.Namespace) -> tuple[dict[str, float], float, DiT]:
    """Best-of-``args.steps`` wall seconds of one training step, split into forward (with the loss), backward and
    optimizer, and the CPU seconds of that step."""
    torch.manual_seed(0)
    model = DiT(ModelConfig.from_preset(preset, gene_vocab_size=args.gene_vocab_size, num_bins=51))
    fused = {"fused": True} if args.optimizer == "fused" else {"foreach": args.optimizer == "foreach"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    diffusion = MaskedDiffusion(DiffusionConfig(), 51)
    batch = random_batch(args.batch_size, args.seq_len, 51, args.gene_vocab_size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    best, best_cpu = {"forward": float("inf"), "backward": float("inf"), "optimizer": float("inf")}, 0.0
    label = f"{preset} {'bf16' if bf16 else 'fp32'}"
    for step in tqdm(range(1 + args.steps), desc=label, leave=False):  # step 0 warms up (allocations, oneDNN)
        cpu_start, start = time.process_time(), time.perf_counter()
        with autocast:
            loss = diffusion.loss(model, batch).loss
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times = {
            "forward": forward - start,
            "backward": backward - forward,
            "optimizer": time.perf_counter() - backward,
        }
        if step and sum(times.values()) < sum(best.values()):
            best, best_cpu = times, time.process_time() - cpu_start
    return best, best_cpu, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "ddsc"])
    parser.add_argument("--batch-size", type=int, default=2, help="cells per step")
    parser.add_argument("--seq-len", type=int, default=1025, help="positions per cell including <cls>")
    parser.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step (best is kept)")
    parser.add_argument("--optimizer", choices=["fused", "foreach", "loop"], default="fused", help="AdamW kernel")
    parser.add_argument("--gene-vocab-size", type=int, default=62_710)
    parser.add_argument("--matmul-size", type=int, default=2048)
    args = parser.parse_args()

    peak, peak_cpu = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        peak[dtype], peak_cpu[dtype] = peak_matmul_flops(dtype, args.matmul_size, 1.5)
    print(
        f"peak matmul ({args.matmul_size}^3, {torch.get_num_threads()} threads): "
        f"fp32 {peak[torch.float32] / 1e9:.1f} GFLOP/s, bf16 {peak[torch.bfloat16] / 1e9:.1f} GFLOP/s"
    )
    print(
        f"batch {args.batch_size} x {args.seq_len} positions, {args.optimizer} AdamW, best of {args.steps} steps "
        f"after warm-up. MFU = model FLOP/s over peak bf16 (in wall time; per CPU second: robust to other load)"
    )
    for preset in args.presets:
        for bf16 in (False, True):
            times, cpu_seconds, model = step_seconds(preset, bf16, args)
            seconds = sum(times.values())
            step_flops = args.batch_size * args.seq_len * model.flops_per_token(args.seq_len)
            split = " / ".join(f"{times[k] / seconds:.0%}" for k in times)
            print(
                f"  {preset:5s} {'bf16' if bf16 else 'fp32'}: {model.num_params() / 1e6:6.1f}M params, "
                f"{args.batch_size * args.seq_len / seconds:7.0f} tokens/s, {step_flops / seconds / 1e9:6.1f} GFLOP/s, "
                f"MFU {step_flops / seconds / peak[torch.bfloat16]:.3f} "
                f"(per CPU second {step_flops / cpu_seconds / peak_cpu[torch.bfloat16]:.3f}), "
                f"fwd / bwd / optimizer {split}"
            )
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (the peak is measured under it too)")


if __name__ == "__main__":
    main()
