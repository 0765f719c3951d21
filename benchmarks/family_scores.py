"""Scoring of benchmarks/model_families.py: both families on the same held-out cells with ``ddsc.eval``'s code.

See model_families.py for the protocol and why generation is compared in the data's bin space.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from ddsc.eval.cell_models import MaskedCellModel
from ddsc.eval.latent_cells import LatentCellModel, latent_imputation, reconstruction
from ddsc.eval.settings import EvalSettings, SamplerSettings


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cell_models(masked, latent, collator, args) -> tuple[MaskedCellModel, LatentCellModel]:
    """Both families behind the evaluation's ``CellModel`` interface (``ddsc.eval.cell_models``)."""
    settings = SamplerSettings(steps=args.masked_steps, seed=args.seed)
    return (
        MaskedCellModel(masked.model, masked.tokens, settings, diffusion_cfg=masked.diffusion),
        LatentCellModel(latent.model, collator, steps=args.latent_steps, seed=args.seed),
    )


def generation_scores(models, cells, train, collator, args) -> dict:
    """``ddsc evaluate``'s generation section for each family: the same halves, panels, PCA and reference."""
    from ddsc.eval.generation import generation_eval

    zero_bin = collator.binning.zero_fraction > 0
    out, wall = {}, {}
    for family, cell_model in zip(("masked", "latent"), models, strict=True):
        start = time.perf_counter()
        metrics, _ = generation_eval(cell_model, cells, train, args.gen_cells, 1000, zero_bin)
        wall[family] = time.perf_counter() - start
        out[family], out["reference"] = metrics["generated"], metrics["reference"]
        out["setup"] = {k: metrics[k] for k in ("num_real", "num_generated", "num_genes", "pca_fit_cells")}
    out["wall_s"] = wall
    return out


def imputation_scores(masked, latent, run, args) -> dict:
    """Masked-bin CE (masked family vs the best bin baseline) and imputed-count Pearson (log1p) of both families
    and the best count baseline (``ddsc evaluate``'s: every bin baseline's implied count, the gene mean, the kNN
    mean), on ``ddsc evaluate``'s fixed masks and its prepared cells ``run`` (``prepare``)."""
    from ddsc.diffusion.masked_diffusion import MaskedDiffusion
    from ddsc.eval.bootstrap import resample_weights
    from ddsc.eval.masked import masked_prediction

    diffusion = MaskedDiffusion(masked.diffusion, masked.config.num_bins)
    rates = (0.15, 0.5)
    results = masked_prediction(
        masked.model,
        diffusion,
        run.cells,
        run.batches,
        run.baselines,
        rates,
        args.seed,
        binning=run.collator.binning,
        count_imputers=run.imputers,
    )
    latent_counts = latent_imputation(latent.model, run.cells, run.batches, rates, args.seed)
    weights = resample_weights(len(run.cells), seed=args.seed)
    out = {}
    for rate in results.bins:
        ce = {name: s.summary()["masked_ce"] for name, s in results.bins[rate].items()}
        count = {name: s.summary(weights)["pearson_log1p"] for name, s in results.counts[rate].items()}
        out[rate] = {
            "masked_ce": {"model": ce.pop("model"), "best_baseline": min(ce.values())},
            "count_pearson": {
                "masked": count.pop("model"),
                "latent": latent_counts[rate].summary(weights)["pearson_log1p"],
                "best_baseline": max(count.values()),
            },
        }
    return out


def embedding_scores(masked, latent, samples, args) -> dict:
    from ddsc.eval.embedding import embedding_eval, pca_baseline
    from ddsc.eval.evaluate import embedding_labels, samples_anndata

    samples = samples[: args.embed_cells]
    labels = embedding_labels(samples, ())
    if not labels:
        return {"skipped": "no label column (cell line, drug, dose) with two or more values"}
    adata = samples_anndata(masked.vocab, samples)
    start = time.perf_counter()
    masked_x = masked.embed(adata, seed=args.seed, conditions={}).obsm["X_ddsc_labels"]
    masked_s = time.perf_counter() - start
    start = time.perf_counter()
    latent_x = latent.embed(adata, seed=args.seed).obsm["X_ddsc_latent"]
    latent_s = time.perf_counter() - start
    embeddings = {"masked": masked_x, "latent": latent_x, "pca50_log1p": pca_baseline(samples)}
    out = embedding_eval(embeddings, labels, k=10, seed=args.seed)
    out["wall_s"] = {"masked": masked_s, "latent": latent_s}
    return out


def drug_effect_scores(models, collator, samples, mds: Path, args) -> dict:
    """``ddsc evaluate``'s known-effect recovery for each family: the same panels, labels and real reference."""
    from ddsc.eval.drug_effects import DrugEffects, find_ground_truth
    from ddsc.eval.ground_truth import ground_truth_eval

    folder = find_ground_truth(mds)
    if folder is None:
        return {"skipped": "no demo ground truth beside the data"}
    truth = DrugEffects.load(folder)
    out = {}
    for family, cell_model in zip(("masked", "latent"), models, strict=True):
        known = ground_truth_eval(
            cell_model, collator, samples, truth, max_control_cells=args.truth_cells, sampled_control_cells=0
        )
        metrics = known[0] if known is not None else {}
        out[family] = metrics.get("expected", {}).get("mean_delta_pearson", float("nan"))
        out["reference"] = metrics.get("reference", {}).get("mean_delta_pearson", float("nan"))
    out["units"] = "masked: expected-bin deltas; latent: decoded log-mean deltas; reference: real mean-bin deltas"
    return out


def score_dataset(name: str, mds: Path, hf_masked: Path, hf_latent: Path, args, stage: Callable[[str], None]) -> dict:

    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.score_threads)  # small models on a shared 2-core machine: spin waits dominate
    try:
        return _score(name, mds, hf_masked, hf_latent, args, stage)
    finally:
        torch.set_num_threads(threads)


def _score(name: str, mds: Path, hf_masked: Path, hf_latent: Path, args, stage: Callable[[str], None]) -> dict:
    from ddsc.eval.evaluate import prepare, read_mds
    from ddsc.inference import Predictor

    masked = Predictor.from_pretrained(hf_masked, progress=False)
    latent = Predictor.from_pretrained(hf_latent, progress=False)
    assert masked.family == "masked" and latent.family == "latent", (masked.family, latent.family)
    samples = read_mds(mds / "valid", args.eval_cells, args.seed)
    train_samples = read_mds(mds / "train", args.fit_cells, args.seed)
    run = prepare(masked.collator, train_samples, samples, EvalSettings(seed=args.seed))  # ddsc evaluate's cells
    collator, cells, train = run.collator, run.cells, run.train
    out = {
        "params": {
            "masked": n_params(masked.model),
            "vae": n_params(latent.model.vae),
            "dit": n_params(latent.model.dit),
        },
        "eval_cells": len(cells),
    }
    models = cell_models(masked, latent, collator, args)
    stage(f"{name}: generation ({args.gen_cells} cells per family on held-out panels)")
    out["generation"] = generation_scores(models, cells, train, collator, args)
    stage(f"{name}: masked-bin CE, imputed counts and NB NLL")
    out["imputation"] = imputation_scores(masked, latent, run, args)
    out["nb_nll"] = reconstruction(latent.model, cells)["nb_nll_per_gene"]
    stage(f"{name}: embeddings ({min(args.embed_cells, len(samples))} cells)")
    out["embedding"] = embedding_scores(masked, latent, samples, args)
    stage(f"{name}: known drug effects")
    out["drug_effects"] = drug_effect_scores(models, collator, samples, mds, args)
    return out


def print_table(name: str, result: dict, args) -> None:
    """One side-by-side table: reference (what it is, per row) | masked DiT | latent VAE + DiT."""
    s, runs = result["scores"], result["runs"]
    rows: list[tuple[str, object, object, object]] = []
    g = s["generation"]
    for key, label in [
        ("mmd_rbf_pca", "gen MMD^2 RBF, PCA-50 (ref: real B vs A)"),
        ("energy_distance_pca", "gen energy distance, PCA-50"),
        ("knn_auc", "gen kNN AUC real vs gen (0.5 best)"),
        ("gene_mean_pearson", "gen per-gene mean Pearson"),
        ("gene_zero_frac_pearson", "gen per-gene zero-frac Pearson"),
        ("pc_variance_ratio", "gen PC variance ratio (1 best)"),
    ]:
        rows.append((label, g["reference"][key], g["masked"][key], g["latent"][key]))
    d = s["drug_effects"]
    if "skipped" not in d:
        rows.append(("drug-effect delta Pearson (ref: real)", d["reference"], d["masked"], d["latent"]))
    e = s["embedding"]
    for column in [c for c in e if c not in ("wall_s", "skipped")]:
        for key in ("knn_accuracy", "ari"):
            label = f"embed {column} {key} (ref: PCA-50)"
            rows.append((label, e[column]["pca50_log1p"][key], e[column]["masked"][key], e[column]["latent"][key]))
    for rate, by in s["imputation"].items():
        ce, count = by["masked_ce"], by["count_pearson"]
        rows.append((f"masked-bin CE @ {rate} (ref: best bin baseline)", ce["best_baseline"], ce["model"], None))
        label = f"imputed-count Pearson @ {rate} (ref: best count baseline)"
        rows.append((label, count["best_baseline"], count["masked"], count["latent"]))
    nll = s["nb_nll"]
    rows.append(("NB NLL / gene (ref: decode z = 0)", nll["prior_mean"], None, nll["posterior_mean"]))
    walls = {k: runs[k]["wall_s"] for k in ("masked", "vae", "latent_dit")}
    rows.append(("train wall s (latent: VAE + DiT)", None, walls["masked"], walls["vae"] + walls["latent_dit"]))
    batches = f"{args.vae_batches} + {args.dit_batches}"
    rows.append(("train batches of 32", None, args.batches, batches))
    p = s["params"]
    rows.append(("parameters (latent: VAE + DiT)", None, p["masked"], f"{p['vae']:,} + {p['dit']:,}"))

    def fmt(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, str):
            return v
        return f"{v:,}" if isinstance(v, int) else f"{v:.4f}"

    width = max(len(r[0]) for r in rows)
    print(f"\n{name}: {s['eval_cells']} held-out cells; generation {g['setup']}")
    print(f"{'metric'.ljust(width)} | {'reference':>12} | {'masked DiT':>12} | {'latent':>20}")
    for label, ref, m, lat in rows:
        print(f"{label.ljust(width)} | {fmt(ref):>12} | {fmt(m):>12} | {fmt(lat):>20}")
