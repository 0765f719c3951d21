"""Masked-bin prediction of the model and the baselines on identical fixed masks, and NELBO on a fixed t grid.

At mask rate r the model sees each cell with its fixed mask (:mod:`ddsc.eval.masks`) applied and, if it is
time-conditioned, the diffusion time t at which the forward process masks a fraction r (1 - alpha(t) = r).
Its softmax at the masked positions, in float64, is scored exactly like the baselines' predictive
distributions, position by position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ddsc.data.tokens import ExpressionTokens
from ddsc.diffusion.masked_diffusion import MaskedDiffusion
from ddsc.diffusion.schedule import Schedule
from ddsc.eval.cells import EvalCells, pack
from ddsc.eval.masks import batch_mask
from ddsc.eval.metrics import MaskedPredictionStats

# predictor(queries) -> probabilities [total masked, K]; queries are (genes, bins, masked) per cell
Baseline = Callable[[Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]], np.ndarray]


def time_for_mask_rate(schedule: Schedule, rate: float) -> float:
    """The t in [0, 1] with 1 - alpha(t) = rate (bisection: every schedule is monotone)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if 1 - float(schedule.alpha(torch.tensor(mid, dtype=torch.float64))) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _to(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def masked_prediction(
    model: Callable,
    diffusion: MaskedDiffusion,
    cells: EvalCells,
    batches: list[list[int]],
    baselines: dict[str, Baseline],
    rates: Sequence[float],
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, MaskedPredictionStats]]:
    """``{rate: {"model" | baseline name: stats}}`` over all cells in ``batches``."""
    tokens = ExpressionTokens(diffusion.num_bins)
    results = {}
    progress = tqdm(total=len(rates) * len(batches), desc="masked prediction", unit="batch")
    for rate in rates:
        stats = {name: MaskedPredictionStats(tokens.num_bins) for name in ("model", *baselines)}
        t = time_for_mask_rate(diffusion.schedule, rate)
        for idx in batches:
            ids = [cells.cell_ids[i] for i in idx]
            batch = pack(cells, idx, tokens)
            mask = batch_mask(batch["gene_ids"], batch["real"], ids, rate, seed)
            batch = _to(batch, device)
            noisy = batch["expr"].masked_fill(mask.to(device), tokens.mask)
            times = torch.full((len(idx),), t, device=device)
            logits = model(batch["gene_ids"], noisy, batch["attention_mask"], batch["cond"], times)
            probs = logits.double().softmax(dim=-1)[mask.to(device)].cpu().numpy()
            targets = batch["expr"][mask.to(device)].cpu().numpy()
            stats["model"].update(probs, targets)
            queries = [
                (cells.genes[i], cells.bins[i], mask[row, 1 : 1 + len(cells.genes[i])].numpy())
                for row, i in enumerate(idx)
            ]
            for name, predict in baselines.items():
                stats[name].update(predict(queries), targets)
            progress.update()
        results[f"{rate:g}"] = stats
    progress.close()
    return results


@torch.no_grad()
def nelbo_grid(
    model: Callable,
    diffusion: MaskedDiffusion,
    cells: EvalCells,
    batches: list[list[int]],
    points: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict:
    """NELBO per real token at the midpoints of ``points`` equal t-intervals of [eps, 1], and their mean.

    The training loss is E_t over t ~ U[eps, 1]; the midpoint rule on a fixed grid with a seeded mask draw
    per (t, batch) makes the estimate deterministic and comparable between checkpoints.
    """
    eps = diffusion.cfg.eps
    grid = [eps + (1 - eps) * (i + 0.5) / points for i in range(points)]
    tokens = ExpressionTokens(diffusion.num_bins)
    per_t = []
    for i, t in enumerate(tqdm(grid, desc="NELBO grid", unit="t")):
        nelbo, real = 0.0, 0
        for j, idx in enumerate(batches):
            batch = _to(pack(cells, idx, tokens), device)
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i * 10_007 + j)
            out = diffusion.loss(model, batch, t=torch.full((len(idx),), t, device=device), generator=generator)
            nelbo += float(out.nelbo_sum)
            real += int(out.num_real)
        per_t.append(nelbo / max(real, 1))
    return {"t": grid, "nelbo_per_t": per_t, "nelbo": float(np.mean(per_t))}
