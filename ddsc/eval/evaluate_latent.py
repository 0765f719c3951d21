"""``ddsc evaluate`` of a latent-family model: the masked family's report, section by section, where it applies.

Shared with the masked family (:func:`ddsc.eval.evaluate.model_sections`, the same code and seeds): the cells,
collated once by the data's collator; generation and perturbation (latent cells binned as real cells are, see
:mod:`ddsc.eval.latent_cells`); embeddings (``X_ddsc_latent`` against PCA-50); the known drug effects.

Count imputation (``imputation_counts``) is scored on the masked family's fixed masks against the same
baselines (every bin baseline's implied count, the gene mean and the kNN mean), so the two families' figures
are directly comparable. The latent family has no bins: no masked-bin CE and no NELBO; in their place
``reconstruction`` gives the VAE's NB negative log-likelihood per gene, decoding the posterior means and the
prior mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ddsc.eval.settings import EvalSettings

if TYPE_CHECKING:
    from ddsc.data.collator import CellCollator
    from ddsc.eval.plots import ReportArrays


def evaluate_latent(
    model,
    collator: CellCollator,
    train_samples: Sequence[dict],
    eval_samples: Sequence[dict],
    settings: EvalSettings,
    embed: Callable[[Sequence[dict]], dict[str, np.ndarray]] | None = None,
) -> tuple[dict, ReportArrays]:
    """All metrics for ``model`` (a ``DDSCLatentModel`` in eval mode) on ``eval_samples``; ``collator`` bins and
    labels cells as the model's training data were (``embed`` as in :func:`ddsc.eval.evaluate.evaluate`)."""
    from ddsc.eval.bootstrap import resample_weights
    from ddsc.eval.counts import CountStats, count_summary
    from ddsc.eval.evaluate import model_sections, prepare
    from ddsc.eval.latent_cells import LatentCellModel, latent_imputation, reconstruction
    from ddsc.eval.masked import mask_queries, score_counts
    from ddsc.eval.masks import cell_mask

    run = prepare(collator, train_samples, eval_samples, settings, embed)
    cells, seed = run.cells, settings.seed
    model_counts = latent_imputation(model, cells, run.batches, settings.mask_rates, seed)
    weights = resample_weights(len(cells), seed=seed)
    run.metrics["imputation_counts"] = {}
    for rate in settings.mask_rates:
        counts = {"model": model_counts[f"{rate:g}"], **{n: CountStats() for n in (*run.baselines, *run.imputers)}}
        for idx in run.batches:
            masks = [cell_mask(cells.cell_ids[i], cells.genes[i], rate, seed) for i in idx]
            queries = mask_queries(cells, idx, masks)
            probs = {name: predict(queries) for name, predict in run.baselines.items()}
            score_counts(counts, probs, cells, idx, masks, run.collator.binning, run.imputers)
        names = list(run.baselines) + list(run.imputers)
        run.metrics["imputation_counts"][f"{rate:g}"] = count_summary(counts, weights, names)
    run.metrics["reconstruction"] = reconstruction(model, cells, settings.batch_size)
    cell_model = LatentCellModel(
        model,
        run.collator,
        steps=settings.sampler.steps,
        guidance_scale=settings.sampler.guidance_scale,
        seed=seed,
        batch_size=settings.batch_size,
        device=settings.device,
    )
    return run.metrics, model_sections(cell_model, run, (train_samples, eval_samples), settings, embed)
