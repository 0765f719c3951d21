"""Evaluate a model: masked prediction and count imputation vs baselines, NELBO, generation, perturbation
and embedding metrics, a report.

The command line is ``ddsc evaluate`` (``ddsc.commands.evaluate``). Everything is seeded: the
evaluation cells, their fixed masks (the same for the model and the baselines), the NELBO noise and the
sampler, so two runs on the same model give the same numbers. The baselines are fitted on the train split
(MDS) or, for an .h5ad, on a seeded half of its cells (the other half is evaluated).

``metrics.json`` layout (95% intervals: percentile bootstrap over evaluation cells, ``*_ci95`` = [low, high]):
``setup``; ``masked.{rate}.{model|marginal|knn|cell_histogram|gene_cell_product}`` (masked_ce and its
``masked_ce_ci95``, masked_acc, masked_acc_pm1, ece, num_masked, for every predictor ``confusion`` [true bin]
[predicted bin], for the model also ``calibration``); ``margins.{rate}``: ``vs_{baseline}`` (baseline CE minus
model CE, > 0 = model better) for each baseline, ``best_baseline`` (the lowest CE), ``vs_best`` and its paired
``vs_best_ci95``; ``imputation_counts.{rate}``: ``scores.{predictor}`` (Pearson with its interval and Spearman
on log1p counts, see :mod:`ddsc.eval.counts`), ``best_baseline``, ``model_minus_best`` (Pearson); ``nelbo``;
``generation`` with ``generated`` and ``reference`` (held-out real) values, in a PCA of the baseline train
cells; ``perturbation`` (cell-eval metrics, see :mod:`ddsc.eval.perturbation`): ``predictors.{model|
control_mean|perturbation_mean|real_half}`` with ``mean``, ``ci95`` (over groups) and ``groups``;
``embedding.{label column}.{ddsc_labels|ddsc_cls|ddsc_mean|pca50_log1p}`` (see :mod:`ddsc.eval.embedding`);
``ground_truth`` (demo data: the model's drug effects against the saved true ones, see
:mod:`ddsc.eval.ground_truth`) with ``expected`` (the model's conditional mean bins), ``generated`` (sampled
cells) and ``reference`` (real held-out cells) per "cell line|drug|dose" group, their means and per-dose means.
A latent-family model's report (``ddsc.eval.evaluate_latent``) has the same sections except ``masked``,
``margins`` and ``nelbo``, and a ``reconstruction`` section instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ddsc.eval.settings import EvalSettings

if TYPE_CHECKING:  # torch-heavy modules are imported where used, so ``ddsc --help`` stays fast
    from ddsc.data.collator import CellCollator
    from ddsc.data.tokens import ExpressionTokens
    from ddsc.diffusion.masked_diffusion import MaskedDiffusion
    from ddsc.eval.cell_models import CellModel
    from ddsc.eval.cells import EvalCells
    from ddsc.eval.plots import ReportArrays
    from ddsc.inference import Predictor

DEFAULT_LABELS = ("cell_line_id", "drug", "dose")  # embedding labels scored when the data carry them


def evaluate(
    model: Callable,
    collator: CellCollator,
    diffusion: MaskedDiffusion,
    train_samples: Sequence[dict],
    eval_samples: Sequence[dict],
    settings: EvalSettings,
    embed: Callable[[Sequence[dict]], dict[str, np.ndarray]] | None = None,
) -> tuple[dict, ReportArrays]:
    """All metrics for ``model`` (a DiT-like denoiser in eval mode) on ``eval_samples`` (MDS-style dicts).

    ``embed`` (samples -> ``{name: [n, d]}``, e.g. :func:`embed_samples`, i.e. ``ddsc embed``) enables the
    embedding evaluation on the label columns of the samples.
    """
    from ddsc.eval.bootstrap import resample_weights
    from ddsc.eval.cell_models import MaskedCellModel
    from ddsc.eval.counts import count_summary
    from ddsc.eval.masked import masked_prediction, masked_summary, nelbo_grid

    run = prepare(collator, train_samples, eval_samples, settings, embed)
    cells, device = run.cells, settings.device
    results = masked_prediction(
        model,
        diffusion,
        cells,
        run.batches,
        run.baselines,
        settings.mask_rates,
        settings.seed,
        device,
        binning=run.collator.binning,
        count_imputers=run.imputers,
    )
    weights = resample_weights(len(cells), seed=settings.seed)
    metrics = run.metrics
    metrics["masked"], metrics["margins"] = masked_summary(results.bins, weights)
    metrics["imputation_counts"] = {
        rate: count_summary(by_name, weights, list(run.baselines) + list(run.imputers))
        for rate, by_name in results.counts.items()
    }
    if settings.nelbo_points:
        metrics["nelbo"] = nelbo_grid(
            model, diffusion, cells, run.batches, settings.nelbo_points, settings.seed, device
        )
    cell_model = MaskedCellModel(model, run.tokens, settings.sampler, device, diffusion.cfg)
    return metrics, model_sections(cell_model, run, (train_samples, eval_samples), settings, embed)


@dataclass
class Prepared:
    """What both families' evaluations start from: the cells collated once by a freshly seeded collator, the
    baselines fitted on the train cells, the evaluation batches and the ``setup`` section."""

    collator: CellCollator
    tokens: ExpressionTokens
    train: EvalCells
    cells: EvalCells
    baselines: dict[str, Callable]  # bin predictors (``ddsc.eval.baselines``)
    imputers: dict[str, Callable]  # count imputers (``ddsc.eval.counts``)
    batches: list[list[int]]
    metrics: dict


def prepare(
    collator: CellCollator,
    train_samples: Sequence[dict],
    eval_samples: Sequence[dict],
    settings: EvalSettings,
    embed: Callable | None = None,
) -> Prepared:
    from ddsc.data.tokens import ExpressionTokens
    from ddsc.eval.baselines import CellHistogramBaseline, GeneCellProductBaseline, KNNBaseline, smoothing_queries
    from ddsc.eval.cells import collate_cells, fresh_collator, length_batches
    from ddsc.eval.counts import KNNMeanCounts

    if embed is not None:
        embedding_labels(eval_samples, settings.embed_labels)  # a missing label column fails before any work
    collator = fresh_collator(collator, settings.seed)
    tokens = ExpressionTokens(collator.binning.num_bins)
    train = collate_cells(collator, train_samples)
    cells = collate_cells(collator, eval_samples)
    if not len(cells) or not len(train):
        raise ValueError(f"need train and evaluation cells, got {len(train)} train and {len(cells)} evaluation")
    knn = KNNBaseline.fit(train.pairs(), tokens.num_bins, k=settings.knn_k, alpha=settings.smoothing)
    fit_queries = smoothing_queries(list(zip(train.cell_ids, train.genes, train.bins, strict=True)), settings.seed)
    histogram = CellHistogramBaseline.fit(knn.marginal.global_probs, fit_queries)
    product = GeneCellProductBaseline.fit(knn.marginal, fit_queries)
    baselines = {
        "marginal": knn.marginal.predict,
        "knn": knn.predict,
        "cell_histogram": histogram.predict,
        "gene_cell_product": product.predict,
    }
    knn_counts = KNNMeanCounts.fit(knn, train)
    imputers = {"gene_mean": knn_counts.gene_mean.predict, "knn_mean": knn_counts.predict}
    setup = {
        "eval_cells": len(cells),
        "baseline_train_cells": len(train),
        "seed": settings.seed,
        "cell_histogram_alpha": {"cell_histogram": histogram.alpha, "gene_cell_product": product.cell.alpha},
    }
    batches = length_batches(cells, range(len(cells)), settings.batch_size)
    return Prepared(collator, tokens, train, cells, baselines, imputers, batches, {"setup": setup})


def model_sections(
    cell_model: CellModel,
    run: Prepared,
    samples: tuple[Sequence[dict], Sequence[dict]],
    settings: EvalSettings,
    embed: Callable[[Sequence[dict]], dict[str, np.ndarray]] | None,
) -> ReportArrays:
    """The sections every model family shares, added to ``run.metrics``: generation and perturbation (cells
    drawn by ``cell_model``, in the data's bins), embeddings (``embed``) and the known drug effects; returns the
    arrays behind their plots. ``samples``: the (train, evaluation) samples ``run`` was prepared from."""
    from ddsc.eval.cells import collate_cells, fresh_collator
    from ddsc.eval.generation import generation_eval, has_treatments, perturbation_eval
    from ddsc.eval.plots import ReportArrays

    collator, train, cells, metrics = run.collator, run.train, run.cells, run.metrics
    train_samples, eval_samples = samples
    arrays = ReportArrays()
    labels = embedding_labels(eval_samples, settings.embed_labels) if embed is not None else {}
    if settings.generate_cells:
        common = dict(
            max_cells=settings.generate_cells,
            max_genes=settings.max_genes,
            zero_bin=collator.binning.zero_fraction > 0,
        )
        metrics["generation"], arrays.pca = generation_eval(cell_model, cells, train, **common)
        if has_treatments(cells, settings.control):
            whole = fresh_collator(collator, settings.seed, max_length=1 << 30)  # every gene of every cell
            pert = perturbation_eval(
                cell_model,
                collate_cells(whole, eval_samples),
                collate_cells(whole, train_samples),
                max_length=collator.max_length,
                control=settings.control,
                min_cells=settings.min_group_cells,
                top_k=settings.top_k,
                **common,
            )
            if pert is not None:
                metrics["perturbation"], arrays.delta_real, arrays.delta_generated = pert
    if embed is not None and labels:
        from ddsc.eval.embedding import embedding_eval, pca_baseline

        embeddings = {**embed(eval_samples), "pca50_log1p": pca_baseline(eval_samples)}
        metrics["embedding"] = embedding_eval(embeddings, labels, k=settings.knn_k, seed=settings.seed)
    if settings.ground_truth:
        from ddsc.eval.drug_effects import DrugEffects
        from ddsc.eval.ground_truth import ground_truth_eval

        known = ground_truth_eval(
            cell_model,
            collator,
            eval_samples,
            DrugEffects.load(settings.ground_truth),
            control=settings.control,
            max_control_cells=settings.truth_control_cells,
            sampled_control_cells=settings.truth_sampled_cells,
            min_obs=settings.truth_min_obs,
        )
        if known is None:
            reason = "the model has no drug condition, or no control cell of a ground-truth cell line was evaluated"
            metrics["ground_truth"] = {"source": settings.ground_truth, "skipped": reason}
        else:
            metrics["ground_truth"], arrays.truth_effect, arrays.truth_generated = known
    return arrays


def embedding_labels(samples: Sequence[dict], columns: Sequence[str]) -> dict[str, list[str]]:
    """Label columns to score embeddings with: the named ``columns`` (an error when a sample lacks one), or by
    default those of ``DEFAULT_LABELS`` present with at least two distinct values."""
    if columns:
        for column in columns:
            if any(column not in s for s in samples):
                raise ValueError(f"--embed-labels: the evaluation cells have no column {column!r}")
        return {c: [str(s[c]) for s in samples] for c in columns}
    found = {c: [str(s.get(c, "")) for s in samples] for c in DEFAULT_LABELS}
    return {c: v for c, v in found.items() if len(set(v)) > 1}


# --------------------------------------------------------------------------------------------- data input


def read_mds(split_dir: Path, max_cells: int, seed: int) -> list[dict]:
    """Up to ``max_cells`` samples of one local MDS split folder, a seeded subset in index order.

    Read through ``StreamingDataset`` (unshuffled), like training, so compressed shards are handled.
    """
    from ddsc.data.checked_dataset import CheckedStreamingDataset

    if not (split_dir / "index.json").is_file():
        raise FileNotFoundError(f"{split_dir}: not an MDS split folder (no index.json)")
    dataset = CheckedStreamingDataset(local=str(split_dir), shuffle=False, batch_size=1)  # names a bad shard
    n = len(dataset)
    idx = range(n) if n <= max_cells else np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))
    return [dataset[int(i)] for i in idx]


def samples_anndata(vocab, samples: Sequence[dict]):
    """Evaluation samples as an AnnData over the model's genes, with Ensembl ids and symbols in ``var``, as a
    user's file would have them."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    column = np.full(len(vocab), -1, dtype=np.int64)
    column[vocab.token_ids] = np.arange(vocab.num_genes)
    rows = np.repeat(np.arange(len(samples)), [len(s["genes"]) for s in samples])
    cols = column[np.concatenate([np.asarray(s["genes"], np.int64) for s in samples])]
    counts = np.concatenate([np.asarray(s["counts"], np.float32) for s in samples])
    x = sp.csr_matrix((counts, (rows, cols)), shape=(len(samples), vocab.num_genes))
    var = pd.DataFrame(
        {"gene_ids": vocab.ensembl_ids, "gene_symbols": vocab.symbols},
        index=[f"token{t}" for t in vocab.token_ids],
    )
    return anndata.AnnData(x, var=var)


def embed_samples(predictor: Predictor, samples: Sequence[dict], seed: int = 0) -> dict[str, np.ndarray]:
    """``ddsc embed`` of evaluation samples: they become an AnnData (``samples_anndata``) and go through
    ``Predictor.embed`` unchanged, with null conditions (``ddsc embed --null-conditions``): a state computed
    from a cell's label would encode the label it is scored against. Every ``X_ddsc_*`` embedding of the
    model's family is returned."""
    out = predictor.embed(samples_anndata(predictor.vocab, samples), seed=seed, conditions={})
    return {key[2:]: out.obsm[key] for key in out.obsm if key.startswith("X_ddsc_")}


def load_data(
    data: Path,
    predictor: Predictor,
    split: str | None,
    train_split: str,
    settings: EvalSettings,
    max_cells: int,
    max_train_cells: int,
    baseline_fraction: float,
    round_counts: bool = False,
) -> tuple[list[dict], list[dict], str]:
    """(baseline train samples, evaluation samples, description of where they came from).

    An .h5ad is read through the model's gene mapping (``Predictor.samples_from_anndata``); its cells are split
    by a seeded hash of the cell name, and cells without any matched non-zero gene are dropped and counted.
    """
    if data.suffix == ".h5ad":
        import anndata

        from ddsc.data.splits import unit_hash

        if not data.is_file():
            raise FileNotFoundError(f"--data {data}: no such file")
        adata = anndata.read_h5ad(data)
        missing = [c for c in settings.embed_labels if c not in adata.obs]
        if missing:
            raise ValueError(f"--embed-labels: {data} has no obs column {missing[0]!r}")
        samples, matched = predictor.samples_from_anndata(adata, round_counts=round_counts)
        for column in settings.embed_labels:  # any obs column the user names can label the embeddings
            for sample, value in zip(samples, adata.obs[column].astype(str), strict=True):
                sample[column] = value
        empty = sum(1 for s in samples if not len(s["genes"]))
        samples = [s for s in samples if len(s["genes"])]
        fit = [s for s in samples if unit_hash(settings.seed, str(s["cell_id"])) < baseline_fraction]
        rest = [s for s in samples if unit_hash(settings.seed, str(s["cell_id"])) >= baseline_fraction]
        source = (
            f"{data} ({adata.n_obs} cells, {empty} dropped without a matched non-zero gene; "
            f"{matched} of {adata.n_vars} genes matched the model vocabulary)"
        )
        return fit[:max_train_cells], rest[:max_cells], source
    if split is None:
        split = "test" if (data / "test" / "index.json").is_file() else "valid"
    train = read_mds(data / train_split, max_train_cells, settings.seed)
    return train, read_mds(data / split, max_cells, settings.seed), f"{data}/{split} (baselines: {train_split})"
