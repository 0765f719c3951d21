"""The latent family as a ``CellModel`` (:mod:`ddsc.eval.cell_models`), and its own imputation and reconstruction.

Generation. Latents are drawn by the rectified flow under the panel's labels, a library size per cell from the
training histogram, and NB counts for every panel gene; the counts are then binned by the data's collator
exactly as real cells are, so that generated and real cells are compared in one space, the space the masked
family generates in. Without zero genes in the binning (``zero_fraction = 0``) a panel holds only genes the
cell expresses, so counts are drawn given ``count >= 1``, as the masked family only draws nonzero bins there.

Expected values (known drug effects). The decoded log mean of every panel gene, averaged over ``draws`` flow
samples. The latents depend on the labels only, so ``draws`` of them are sampled once per distinct label set,
always from the same seeded noise (common random numbers), and every panel is decoded with those of its labels
and its own library: a delta between two label sets is the labels' effect alone, and the flow runs once per
label set, not once per panel.

Imputation (``latent_imputation``). The hidden genes of a cell are taken out of the encoder's input (its
attention mask) and out of its library; the decoder then gives their NB means. The decoder's rates are shares
of the library of the whole collated cell, of which the hidden genes' counts are missing: the library is
divided by ``1 - s``, ``s`` the hidden genes' share predicted by the decoder itself (capped at 0.9).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ddsc.data.batch_layout import cell_layout, pad_cells
from ddsc.data.collator import CellCollator
from ddsc.eval.cell_models import generated_cells, panel_cells
from ddsc.eval.cells import EvalCells, length_batches
from ddsc.eval.counts import CountStats
from ddsc.eval.masks import batch_mask
from ddsc.latent.flow import initial_noise
from ddsc.latent.nb import sample_nb
from ddsc.latent.vae import NBParams, log_library

MAX_HIDDEN_SHARE = 0.9


@dataclass
class LatentCellModel:
    """``model``: a ``DDSCLatentModel``; ``collator``: the data's (its binning, labels and conditions)."""

    model: torch.nn.Module
    collator: CellCollator
    steps: int
    guidance_scale: float = 1.0
    seed: int = 0
    draws: int = 32
    batch_size: int = 64
    device: torch.device | str = "cpu"
    expected_units = "decoded log NB mean, averaged over flow draws"

    def sampler(self) -> dict:
        return {"sampler": "euler (rectified flow) + NB counts", "steps": self.steps}

    def _latents(self, cond: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        return self._sample(initial_noise(len(cond), self.model.latent_shape, generator), cond)

    def _sample(self, noise: torch.Tensor, cond: np.ndarray) -> torch.Tensor:
        cond_t = torch.from_numpy(cond).to(self.device) if cond.shape[1] else None
        return self.model.sample_latents(noise.to(self.device), cond_t, self.steps, self.guidance_scale)

    def _panel_batch(self, panels: EvalCells, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        gene_ids, _, real = pad_cells([panels.genes[i] for i in rows], [panels.bins[i] for i in rows])
        return gene_ids.to(self.device), real

    @torch.no_grad()
    def generate(self, cells: EvalCells, idx: list[int], cond: np.ndarray | None = None) -> EvalCells:
        panels = panel_cells(cells, idx, cond)
        generator = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        nonzero_only = self.collator.binning.zero_fraction == 0
        bins: list[np.ndarray] = [np.zeros(0, np.int64)] * len(idx)
        for rows in length_batches(panels, range(len(idx)), self.batch_size):
            gene_ids, real = self._panel_batch(panels, rows)
            z = self._latents(panels.cond[rows], generator)
            params = self.model.decode(z, gene_ids, self.model.sample_log_library(len(rows), generator).to(self.device))
            mu, theta, pi = nb_arrays(params)
            counts = torch.from_numpy(np.where(real.numpy(), sample_nb(mu, theta, pi, rng, nonzero_only), 0.0))
            drawn = self.collator.bins_for(counts, real)
            for r, j in enumerate(rows):
                bins[j] = drawn[r, : len(panels.genes[j])].numpy().astype(np.int64)
        return generated_cells(cells, idx, panels, bins)

    @torch.no_grad()
    def expected(self, panels: EvalCells, cond: np.ndarray) -> list[np.ndarray]:
        # The latents depend on the labels alone: ``draws`` of them per distinct label row, from the same noise
        # for every row and every call, then every panel decoded with those of its labels.
        rows, owner = np.unique(cond, axis=0, return_inverse=True)
        noise = initial_noise(self.draws, self.model.latent_shape, torch.Generator().manual_seed(self.seed))
        z = torch.cat(
            [self._sample(noise, np.repeat(rows[k : k + 1], self.draws, axis=0)) for k in range(len(rows))]
        ).reshape(len(rows), self.draws, *self.model.latent_shape)
        out: list[np.ndarray] = [np.zeros(0)] * len(panels)
        per_batch = max(1, self.batch_size // self.draws)
        for start in range(0, len(panels), per_batch):
            batch = list(range(start, min(start + per_batch, len(panels))))
            gene_ids, real = self._panel_batch(panels, batch)
            library = log_library(self._panel_counts(panels, batch, real.shape[1]), real).to(self.device)
            params = self.model.decode(
                z[owner.reshape(-1)[batch]].flatten(0, 1),
                gene_ids.repeat_interleave(self.draws, 0),
                library.repeat_interleave(self.draws),
            )
            mean = params.log_mu.double().reshape(len(batch), self.draws, -1).mean(1).cpu().numpy()
            for r, j in enumerate(batch):
                out[j] = mean[r, : len(panels.genes[j])]
        return out

    @staticmethod
    def _panel_counts(panels: EvalCells, rows: Sequence[int], width: int) -> torch.Tensor:
        """The panels' real counts (their bins + 1 for cells without counts: a library that only has to be the
        same under every label set)."""
        counts = torch.zeros(len(rows), width)
        for r, j in enumerate(rows):
            values = panels.counts[j] if panels.counts is not None else panels.bins[j] + 1.0
            counts[r, : len(values)] = torch.from_numpy(np.asarray(values, np.float32))
        return counts


def nb_arrays(params: NBParams) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(mu, theta, zero-inflation probability or None) as float64 numpy arrays."""
    pi = None if params.zi_logits is None else torch.sigmoid(params.zi_logits.double()).cpu().numpy()
    return params.log_mu.double().exp().cpu().numpy(), params.log_theta.double().exp().cpu().numpy(), pi


def _cells_batch(model, cells: EvalCells, idx: Sequence[int]) -> dict[str, torch.Tensor]:
    genes, counts, valid = pad_cells([cells.genes[i] for i in idx], [cells.counts[i] for i in idx])
    return {k: v.to(model.device) for k, v in cell_layout(genes, valid, counts).items()}


@torch.no_grad()
def latent_imputation(
    model, cells: EvalCells, batches: list[list[int]], rates: Sequence[float], seed: int = 0
) -> dict[str, CountStats]:
    """Per mask rate (``f"{rate:g}"``) the model's imputed counts at the fixed masks of :mod:`ddsc.eval.masks`
    (the masked family's masks), from the cells' other genes alone (see the module docstring)."""
    out = {}
    for rate in rates:
        stats = CountStats()
        for idx in batches:
            batch = _cells_batch(model, cells, idx)
            mask = batch_mask(
                batch["gene_ids"].cpu(), batch["real"].cpu(), [cells.cell_ids[i] for i in idx], rate, seed
            )
            mask = mask.to(model.device)
            seen = batch["real"] & ~mask
            z = model.encode(batch["gene_ids"], batch["counts"] * seen, batch["attention_mask"] & ~mask)
            observed = log_library(batch["counts"], seen)
            first = model.decode(z, batch["gene_ids"], observed)
            share = torch.where(mask, first.log_mu.double().exp(), 0.0).sum(1) / observed.double().exp()
            full = observed - torch.log1p(-share.clamp(max=MAX_HIDDEN_SHARE)).float()
            mu, _, pi = nb_arrays(model.decode(z, batch["gene_ids"], full))
            mean = mu if pi is None else mu * (1 - pi)
            m = mask.cpu().numpy()
            owner = np.repeat(idx, m.sum(1))
            stats.update(mean[m], batch["counts"].cpu().numpy()[m], owner)
        out[f"{rate:g}"] = stats
    return out


@torch.no_grad()
def reconstruction(model, cells: EvalCells, batch_size: int = 64) -> dict:
    """NB negative log-likelihood per real gene of the cells' counts: decoding the VAE posterior means, and the
    prior mean z = 0 (what the decoder knows without the cell: the gap is what the latents carry)."""
    sums, n = {"posterior_mean": 0.0, "prior_mean": 0.0}, 0
    for idx in length_batches(cells, range(len(cells)), batch_size):
        batch = _cells_batch(model, cells, idx)
        mean = model.encode(batch["gene_ids"], batch["counts"], batch["attention_mask"])
        library = log_library(batch["counts"], batch["real"])
        for name, z in (("posterior_mean", mean), ("prior_mean", torch.zeros_like(mean))):
            params = model.decode(z, batch["gene_ids"], library)
            sums[name] -= float(torch.where(batch["real"], params.log_prob(batch["counts"]), 0.0).sum())
        n += int(batch["real"].sum())
    nll = {name: s / max(n, 1) for name, s in sums.items()}
    return {"nb_nll_per_gene": nll, "latent_gain_nats": nll["prior_mean"] - nll["posterior_mean"], "num_genes": n}
