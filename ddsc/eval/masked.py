"""Masked-bin prediction of the model and the baselines on identical fixed masks, and NELBO on a fixed t grid.

At mask rate r the model sees each cell with its fixed mask (:mod:`ddsc.eval.masks`) applied and, if it is
time-conditioned, the diffusion time t at which the forward process masks a fraction r (1 - alpha(t) = r).
Its softmax at the masked positions, in float64, is scored exactly like the baselines' predictive
distributions, position by position. When the cells carry their counts and a binning is given, the same
distributions are also scored in count space (:mod:`ddsc.eval.counts`) beside count imputations that never
see bins, on the same masked positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ddsc.data.binning_config import BinningConfig
from ddsc.data.tokens import ExpressionTokens
from ddsc.diffusion.masked_diffusion import MaskedDiffusion
from ddsc.diffusion.schedule import Schedule
from ddsc.eval.bootstrap import ratio_interval
from ddsc.eval.cells import EvalCells, pack
from ddsc.eval.counts import CountStats, cell_bin_values
from ddsc.eval.masks import batch_mask
from ddsc.eval.metrics import MaskedPredictionStats

# predictor(queries) -> probabilities [total masked, K]; queries are (genes, bins, masked) per cell
Baseline = Callable[[Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]], np.ndarray]
# imputer(queries) -> counts [total masked]
CountImputer = Callable[[Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]], np.ndarray]


@dataclass
class MaskedResults:
    """Per mask rate (``f"{rate:g}"``) and predictor: bin scores, and (when scored) count-space scores."""

    bins: dict[str, dict[str, MaskedPredictionStats]]
    counts: dict[str, dict[str, CountStats]]


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
    binning: BinningConfig | None = None,
    count_imputers: dict[str, CountImputer] | None = None,
) -> MaskedResults:
    """Scores of ``"model"`` and every baseline over all cells in ``batches``, at every mask rate.

    With ``binning`` (and counts in ``cells``), every bin predictor's implied count and every
    ``count_imputers`` prediction is scored against the true counts too.
    """
    tokens = ExpressionTokens(diffusion.num_bins)
    in_counts = binning is not None and cells.counts is not None
    imputers = count_imputers or {}
    results = MaskedResults({}, {})
    progress = tqdm(total=len(rates) * len(batches), desc="masked prediction", unit="batch")
    for rate in rates:
        stats = {name: MaskedPredictionStats(tokens.num_bins) for name in ("model", *baselines)}
        counts = {name: CountStats() for name in ("model", *baselines, *imputers)} if in_counts else {}
        t = time_for_mask_rate(diffusion.schedule, rate)
        for idx in batches:
            ids = [cells.cell_ids[i] for i in idx]
            batch = pack(cells, idx, tokens)
            mask = batch_mask(batch["gene_ids"], batch["real"], ids, rate, seed)
            batch = _to(batch, device)
            noisy = batch["expr"].masked_fill(mask.to(device), tokens.mask)
            times = torch.full((len(idx),), t, device=device)
            logits = model(batch["gene_ids"], noisy, batch["attention_mask"], batch["cond"], times)
            masks = [mask[row, 1 : 1 + len(cells.genes[i])].numpy() for row, i in enumerate(idx)]
            queries = mask_queries(cells, idx, masks)
            targets = np.concatenate([bins[m] for _, bins, m in queries])
            owner = np.repeat(idx, [int(m.sum()) for m in masks])  # the evaluation cell of each masked position
            probs = {"model": logits.double().softmax(dim=-1)[mask.to(device)].cpu().numpy()}
            probs.update({name: predict(queries) for name, predict in baselines.items()})
            for name, p in probs.items():
                stats[name].update(p, targets, owner)
            if in_counts:
                score_counts(counts, probs, cells, idx, masks, binning, imputers)
            progress.update()
        results.bins[f"{rate:g}"] = stats
        results.counts[f"{rate:g}"] = counts
    progress.close()
    return results


def mask_queries(cells: EvalCells, idx: Sequence[int], masks: Sequence[np.ndarray]) -> list[tuple]:
    """The baselines' queries: (genes, bins, masked) of cells ``idx``."""
    return [(cells.genes[i], cells.bins[i], m) for i, m in zip(idx, masks, strict=True)]


def score_counts(
    counts: dict[str, CountStats],
    probs: dict[str, np.ndarray],
    cells: EvalCells,
    idx: Sequence[int],
    masks: Sequence[np.ndarray],
    binning: BinningConfig,
    imputers: dict[str, CountImputer],
) -> None:
    """Add to ``counts`` the implied count of every bin distribution in ``probs`` (masked positions of cells
    ``idx``, in order) and every imputer's prediction, against the true counts."""
    per_row = [int(m.sum()) for m in masks]
    owner = np.repeat(idx, per_row)
    values = cell_bin_values(cells, idx, masks, binning)[np.repeat(np.arange(len(idx)), per_row)]
    true = np.concatenate([cells.counts[i][m] for i, m in zip(idx, masks, strict=True)])
    for name, p in probs.items():
        counts[name].update((p * values).sum(axis=1), true, owner)
    queries = mask_queries(cells, idx, masks)
    for name, impute in imputers.items():
        counts[name].update(impute(queries), true, owner)


def masked_summary(stats: dict[str, dict], weights: np.ndarray) -> tuple[dict, dict]:
    """(``masked``, ``margins``) sections: scores per rate and predictor with a 95% interval of the masked CE
    over cells, and the model's CE margin over every baseline and over the best one, with its paired interval."""
    masked, margins = {}, {}
    for rate, by_name in stats.items():
        per_cell = {name: _per_cell(s, weights.shape[1]) for name, s in by_name.items()}
        masked[rate] = {
            name: {
                **s.summary(),
                "masked_ce_ci95": ratio_interval(*per_cell[name], weights),
                "confusion": s.confusion,
                **({"calibration": s.calibration()} if name == "model" else {}),
            }
            for name, s in by_name.items()
        }
        names = [name for name in by_name if name != "model"]
        best = min(names, key=lambda name: masked[rate][name]["masked_ce"])
        model_ce, n = per_cell["model"]
        margins[rate] = {
            **{f"vs_{b}": masked[rate][b]["masked_ce"] - masked[rate]["model"]["masked_ce"] for b in names},
            "best_baseline": best,
            "vs_best": masked[rate][best]["masked_ce"] - masked[rate]["model"]["masked_ce"],
            "vs_best_ci95": ratio_interval(per_cell[best][0] - model_ce, n, weights),
        }
    return masked, margins


def _per_cell(stats: MaskedPredictionStats, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """(CE sum, masked positions) per evaluation cell, zero-padded to ``n_cells``."""
    pad = n_cells - len(stats.cell_n)
    return np.pad(stats.cell_ce, (0, pad)), np.pad(stats.cell_n, (0, pad))


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
