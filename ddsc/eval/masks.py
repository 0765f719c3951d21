"""Fixed, seeded evaluation masks: the same cell always gets the same masked genes, for every predictor.

A cell's mask depends only on (seed, cell id, its gene ids), never on batch order, collation or which
predictor is scored, so the model and the baselines are compared on identical positions and reruns are
reproducible. Masks are nested across rates (the genes masked at 0.1 are also masked at 0.3, ...): each gene
draws one uniform number and a rate masks the lowest ``round(rate * n)`` of them, which makes the
CE-vs-mask-rate curve smooth instead of re-sampling noise at every rate.
"""

from __future__ import annotations

import zlib

import numpy as np

MASK_RATES: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)


def cell_mask(cell_id: str, genes: np.ndarray, rate: float, seed: int = 0) -> np.ndarray:
    """Boolean mask over ``genes`` with ``max(1, round(rate * n))`` masked genes (0 for an empty cell)."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"mask rate must be in (0, 1], got {rate}")
    genes = np.asarray(genes, dtype=np.int64)
    n = len(genes)
    rng = np.random.default_rng([seed, zlib.crc32(cell_id.encode())])
    u = np.empty(n)
    order = np.argsort(genes, kind="stable")  # draws follow gene id order, not the position order
    u[order] = rng.random(n)
    mask = np.zeros(n, dtype=bool)
    if n:
        mask[np.argsort(u, kind="stable")[: max(1, round(rate * n))]] = True
    return mask


def batch_mask(gene_ids, real, cell_ids: list[str], rate: float, seed: int = 0):
    """Collated-batch version for torch tensors ``[B, L]``: bool, True only at masked real positions."""
    mask = real.new_zeros(real.shape)
    for row, cell_id in enumerate(cell_ids):
        pos = real[row].nonzero().squeeze(1)
        chosen = cell_mask(cell_id, gene_ids[row, pos].cpu().numpy(), rate, seed)
        mask[row, pos[real.new_tensor(chosen)]] = True
    return mask
