"""Training-step throughput of the DiT on CPU, fp32 vs bf16 autocast, as MFU.

MFU = model FLOP/s (``DiT.flops_per_token`` x tokens per second, forward + backward) divided by the peak
bf16 matmul FLOP/s of this machine, measured in the same run with large square matmuls. Each step is a full
training step: MDLM loss (masking, forward, backward) and an AdamW update. Target: MFU >= 0.4 with bf16 for
the DDSC-size preset (d_model 768, 12 layers, 12 heads).
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

from ddsc.data.tokens import GENE_CLS, ExpressionTokens
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.masked_diffusion import MaskedDiffusion
from ddsc.model.config import ModelConfig
from ddsc.model.dit import DiT


def peak_matmul_flops(dtype: torch.dtype, size: int, seconds: float) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def random_batch(batch_size: int, length: int, num_bins: int, gene_vocab_size: int) -> dict[str, torch.Tensor]:
    tokens = ExpressionTokens(num_bins)
    gene_ids = torch.randint(3, gene_vocab_size, (batch_size, length))
    expr = torch.randint(0, num_bins, (batch_size, length))
    gene_ids[:, 0], expr[:, 0] = GENE_CLS, tokens.cls
    real = torch.ones(batch_size, length, dtype=torch.bool)
    real[:, 0] = False
    return {"gene_ids": gene_ids, "expr": expr, "real": real, "attention_mask": torch.ones_like(real)}


def tokens_per_second(preset: str, bf16: bool, args: argparse.Namespace) -> tuple[float, DiT]:
    torch.manual_seed(0)
    model = DiT(ModelConfig.from_preset(preset, gene_vocab_size=args.gene_vocab_size, num_bins=51))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = MaskedDiffusion(DiffusionConfig(), 51)
    batch = random_batch(args.batch_size, args.seq_len, 51, args.gene_vocab_size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with autocast:
            loss = diffusion.loss(model, batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    label = f"{preset} {'bf16' if bf16 else 'fp32'}"
    start = time.perf_counter()
    for _ in tqdm(range(args.steps), desc=label, leave=False):
        step()
    return args.steps * args.batch_size * args.seq_len / (time.perf_counter() - start), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "ddsc"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256, help="positions per cell including <cls>")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gene-vocab-size", type=int, default=62_710)
    parser.add_argument("--matmul-size", type=int, default=2048)
    args = parser.parse_args()

    peak = {dtype: peak_matmul_flops(dtype, args.matmul_size, 3.0) for dtype in (torch.float32, torch.bfloat16)}
    print(
        f"peak matmul ({args.matmul_size}^3, {torch.get_num_threads()} threads): "
        f"fp32 {peak[torch.float32] / 1e9:.1f} GFLOP/s, bf16 {peak[torch.bfloat16] / 1e9:.1f} GFLOP/s"
    )
    print(f"batch {args.batch_size} x {args.seq_len} positions, {args.steps} steps after warm-up")
    for preset in args.presets:
        for bf16 in (False, True):
            rate, model = tokens_per_second(preset, bf16, args)
            flops = rate * model.flops_per_token(args.seq_len)
            print(
                f"  {preset:5s} {'bf16' if bf16 else 'fp32'}: {model.num_params() / 1e6:7.1f}M params, "
                f"{rate:8.0f} tokens/s, {flops / 1e9:7.1f} GFLOP/s, "
                f"MFU {flops / peak[torch.bfloat16]:.3f} of peak bf16 ({flops / peak[torch.float32]:.3f} of peak fp32)"
            )


if __name__ == "__main__":
    main()
