"""What the generation-side evaluations ask of a model, so that every model family is scored by the same code.

``generation_eval``, ``perturbation_eval`` (:mod:`ddsc.eval.generation`) and ``ground_truth_eval``
(:mod:`ddsc.eval.ground_truth`) see a model only through a ``CellModel``:

- ``generate(cells, idx, cond)``: new cells with the gene panels of ``cells[idx]`` and labels ``cond`` (default:
  their own), every bin drawn by the model, in the data's bins, so that real and generated cells are compared
  in one space whatever the family;
- ``expected(panels, cond)``: per panel gene the model's noise-free conditional mean under ``cond``, in the
  family's own units (``expected_units``): known-effect recovery is a Pearson correlation, blind to the scale;
- ``sampler``: how ``generate`` samples, for the report.

``MaskedCellModel`` is the masked family's; ``ddsc.eval.latent_cells.LatentCellModel`` the latent family's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from ddsc.data.tokens import ExpressionTokens
from ddsc.diffusion.samplers import guided_log_probs, sample
from ddsc.eval.cells import EvalCells, length_batches, pack
from ddsc.eval.settings import SamplerSettings


class CellModel(Protocol):
    seed: int
    expected_units: str

    def generate(self, cells: EvalCells, idx: list[int], cond: np.ndarray | None = None) -> EvalCells: ...

    def expected(self, panels: EvalCells, cond: np.ndarray) -> list[np.ndarray]: ...

    def sampler(self) -> dict: ...


def panel_cells(cells: EvalCells, idx: list[int], cond: np.ndarray | None) -> EvalCells:
    """The panels of ``cells[idx]`` with labels ``cond`` (default: their own), the input of ``generate``."""
    labels = cells.cond[idx] if cond is None else np.asarray(cond, cells.cond.dtype)
    return EvalCells(
        [cells.cell_ids[i] for i in idx], [cells.genes[i] for i in idx], [cells.bins[i] for i in idx], labels, {}
    )


def generated_cells(cells: EvalCells, idx: list[int], panels: EvalCells, bins: list[np.ndarray]) -> EvalCells:
    """``generate``'s answer: ``panels`` with drawn ``bins``, ids and metadata of ``cells[idx]``."""
    metadata = {c: [v[i] for i in idx] for c, v in cells.metadata.items()}
    return EvalCells([cells.cell_ids[i] for i in idx], list(panels.genes), bins, panels.cond, metadata)


@dataclass
class MaskedCellModel:
    """The masked discrete family: ``generate`` runs the configured sampler, ``expected`` is the expected bin
    with every bin masked at t = 1, i.e. the mean of the per-gene distribution that the first generation step
    draws from (guidance and temperature as in ``settings``): the model's conditional mean bin, one forward pass
    per panel and label set."""

    model: Callable
    tokens: ExpressionTokens
    settings: SamplerSettings
    device: torch.device | str = "cpu"
    diffusion_cfg: object = None
    expected_units = "expected bin (all bins masked, t = 1)"

    @property
    def seed(self) -> int:
        return self.settings.seed

    def sampler(self) -> dict:
        return {"sampler": self.settings.method, "steps": self.settings.steps}

    def generate(self, cells: EvalCells, idx: list[int], cond: np.ndarray | None = None) -> EvalCells:
        panels = panel_cells(cells, idx, cond)
        bins: list[np.ndarray] = [np.zeros(0, np.int64)] * len(idx)
        generator = torch.Generator(device=self.device).manual_seed(self.settings.seed)
        batches = length_batches(panels, range(len(idx)), self.settings.batch_size)
        for rows in tqdm(batches, desc="generate", unit="batch"):
            batch = {k: v.to(self.device) for k, v in pack(panels, rows, self.tokens).items()}
            out = sample(
                self.model,
                batch,
                method=self.settings.method,
                steps=self.settings.steps,
                temperature=self.settings.temperature,
                guidance_scale=self.settings.guidance_scale,
                generator=generator,
                diffusion=self.diffusion_cfg,
            )
            expr = out.expr.cpu()
            for r, j in enumerate(rows):
                bins[j] = expr[r, 1 : 1 + len(panels.genes[j])].numpy().astype(np.int64)
        return generated_cells(cells, idx, panels, bins)

    def expected(self, panels: EvalCells, cond: np.ndarray) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.zeros(0)] * len(panels)
        bins = torch.arange(self.tokens.num_bins, dtype=torch.float64, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for rows in length_batches(panels, range(len(panels)), self.settings.batch_size):
                    batch = {k: v.to(self.device) for k, v in pack(panels, rows, self.tokens, cond[rows]).items()}
                    masked = batch["expr"].masked_fill(batch["real"], self.tokens.mask)
                    t = torch.ones(len(rows), device=self.device)
                    s = self.settings
                    log_probs, _ = guided_log_probs(self.model, batch, masked, t, s.guidance_scale, s.temperature)
                    mean = (log_probs.exp() @ bins).cpu().numpy()
                    for r, j in enumerate(rows):
                        out[j] = mean[r, 1 : 1 + len(panels.genes[j])]
        finally:
            self.model.train(was_training)
        return out
