"""Training-step throughput of the new paths against their references, measured in one run on this machine.

Usage: ``python benchmarks/throughput.py [--preset ddsc] [--steps 5] [--no-compile]``

Three comparisons, each a ratio of the same work done two ways, the two alternating step by step (best of
``--steps`` each), so machine noise hits both sides alike:

1. Attention layout (``model.attention``): real-token training throughput (forward + backward + AdamW) of the
   ``unpadded`` path over the ``masked`` reference, on two length profiles:
   - mouse10k-like: 32 cells whose gene counts are drawn from the real mouse10k cells (median 65 genes,
     ``../shared/data/mouse10k`` or ``tests/data/mouse10k``), padded to the longest, as the collator does;
   - Tahoe-like: 2 cells of 1,024 genes + ``<cls>``, no padding (Tahoe cells hold more genes than that).
2. ``parallelism.compile``: compiled blocks over eager, Tahoe-like cells (compile time is reported, not timed).
3. Optimizer step alone: torch AdamW (foreach on CPU; what ``optimizer.name: adamw`` builds here) over
   Composer's ``DecoupledAdamW``, on every parameter of the model.

Targets on CPU: (1) >= 1.3x on mouse10k-like lengths, >= 0.97x on Tahoe-like ones.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import scipy.io
import torch

from ddsc.data.tokens import GENE_CLS, GENE_PAD, ExpressionTokens
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.masked_diffusion import MaskedDiffusion
from ddsc.model.config import ModelConfig
from ddsc.model.dit import DiT
from ddsc.train.builders import build_optimizer
from ddsc.train.config import OptimizerConfig

ROOT = Path(__file__).resolve().parents[1]
K = 51
VOCAB = 62_710


def mouse10k_lengths() -> np.ndarray:
    """Non-zero genes per cell of the real mouse10k cells."""
    for folder in (ROOT.parent / "shared" / "data" / "mouse10k", ROOT / "tests" / "data" / "mouse10k"):
        if (folder / "matrix.mtx.gz").is_file():
            with gzip.open(folder / "matrix.mtx.gz") as f:
                matrix = scipy.io.mmread(f).tocsc()  # genes x cells
            return np.diff(matrix.indptr)
    raise SystemExit("throughput.py: mouse10k not found (../shared/data/mouse10k or tests/data/mouse10k)")


def batch_of(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Cells of the given gene counts (+ ``<cls>``) padded to the longest, laid out as the collator does."""
    g = torch.Generator().manual_seed(seed)
    tokens, width = ExpressionTokens(K), max(lengths) + 1
    gene_ids = torch.full((len(lengths), width), GENE_PAD)
    expr = torch.full((len(lengths), width), tokens.pad)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        gene_ids[i, 0], expr[i, 0] = GENE_CLS, tokens.cls
        gene_ids[i, 1 : n + 1] = torch.randint(3, VOCAB, (n,), generator=g)
        expr[i, 1 : n + 1] = torch.randint(0, K, (n,), generator=g)
        mask[i, : n + 1] = True
    real = mask.clone()
    real[:, 0] = False
    return {"gene_ids": gene_ids, "expr": expr, "attention_mask": mask, "real": real}


class Step:
    """One full training step of a model on a fixed batch (same noise every step)."""

    def __init__(self, cfg: ModelConfig, batch: dict, optimizer: str = "adamw"):
        torch.manual_seed(0)
        self.model = DiT(cfg).train()
        self.optimizer = build_optimizer(OptimizerConfig(name=optimizer), self.model, "cpu")
        self.diffusion = MaskedDiffusion(DiffusionConfig(), K)
        self.batch = batch

    def __call__(self) -> float:
        start = time.perf_counter()
        out = self.diffusion.loss(self.model, self.batch, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def alternate(a, b, steps: int) -> tuple[float, float]:
    """Best-of-``steps`` seconds of ``a()`` and ``b()``, run alternately after one warm-up each."""
    a(), b()
    times_a, times_b = [], []
    for _ in range(steps):
        times_a.append(a())
        times_b.append(b())
    return min(times_a), min(times_b)


def optimizer_steps(cfg: ModelConfig, steps: int) -> tuple[float, float]:
    """Best-of seconds of ``optimizer.step()`` alone: torch AdamW (foreach) and DecoupledAdamW."""
    runners = []
    for name in ("adamw", "decoupled_adamw"):
        torch.manual_seed(0)
        model = DiT(cfg)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        optimizer = build_optimizer(OptimizerConfig(name=name, weight_decay=1e-5), model, "cpu")

        def run(optimizer=optimizer) -> float:
            start = time.perf_counter()
            optimizer.step()
            return time.perf_counter() - start

        runners.append(run)
    return alternate(*runners, steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ddsc", help="model size (ddsc: d_model 768, 12 layers; default)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (default 5)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled-vs-eager comparison")
    args = parser.parse_args(argv)
    cfg = ModelConfig.from_preset(args.preset, num_bins=K)
    rng = np.random.default_rng(0)
    lengths = mouse10k_lengths()
    profiles = {
        "mouse10k-like (32 cells, median 65 genes)": [int(n) for n in rng.choice(lengths[lengths > 0], 32)],
        "Tahoe-like (2 cells x 1,024 genes)": [1024, 1024],
    }
    print(f"{args.preset}: d_model {cfg.d_model}, {cfg.n_layers} layers; best of {args.steps} alternating steps")
    print(f"{'comparison':58} {'ours':>9} {'reference':>10} {'ratio':>7}")
    for label, cells in profiles.items():
        batch = batch_of(cells, seed=2)
        real = int(batch["attention_mask"].sum())
        padding = 1 - real / batch["attention_mask"].numel()
        new, reference = (
            Step(ModelConfig(**{**vars(cfg), "attention": mode}), batch) for mode in ("unpadded", "masked")
        )
        t_new, t_ref = alternate(new, reference, args.steps)
        row = f"{label}, {padding:.0%} padding: real tokens/s"
        print(f"{row:58} {real / t_new:9.0f} {real / t_ref:10.0f} {t_ref / t_new:6.2f}x")
    if not args.no_compile:
        tahoe = batch_of(profiles["Tahoe-like (2 cells x 1,024 genes)"], seed=2)
        eager, compiled = Step(cfg, tahoe), Step(cfg, tahoe)
        compiled.model.compile_blocks()
        start = time.perf_counter()
        compiled()
        print(f"(compiling {cfg.n_layers} blocks took {time.perf_counter() - start:.0f} s, not timed)")
        t_comp, t_eager = alternate(compiled, eager, args.steps)
        row = "compiled / eager blocks, Tahoe-like: steps/s"
        print(f"{row:58} {1 / t_comp:9.3f} {1 / t_eager:10.3f} {t_eager / t_comp:6.2f}x")
    t_adamw, t_decoupled = optimizer_steps(cfg, args.steps)
    row = "torch AdamW (foreach) / DecoupledAdamW: optimizer steps/s"
    print(f"{row:58} {1 / t_adamw:9.2f} {1 / t_decoupled:10.2f} {t_decoupled / t_adamw:6.2f}x")


if __name__ == "__main__":
    main()
