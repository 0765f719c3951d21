"""Scoring of benchmarks/model_families.py: both families on the same held-out cells with ``ddsc.eval``'s code.

See model_families.py for the protocol and why generation is compared in the data's bin space.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from ddsc.data.batch_layout import cell_layout, pad_cells
from ddsc.eval.cells import EvalCells, collate_cells, fresh_collator, length_batches
from ddsc.eval.metrics import PCA, generation_metrics, pearson
from ddsc.eval.settings import SamplerSettings

CONTROL = "DMSO_TF"


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def truncated_nb(mu: np.ndarray, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Counts from NB(mu, theta) conditioned on ``count >= 1`` (inverse CDF above the zero mass)."""
    p = theta / (theta + mu)
    zero = np.exp(theta * np.log(p))
    u = zero + (1 - zero) * rng.random(mu.shape)
    return np.maximum(stats.nbinom.ppf(np.minimum(u, 1 - 1e-12), theta, p), 1).astype(np.int64)


@torch.no_grad()
def latent_panel_cells(latent, cells: EvalCells, idx: list[int], collator, steps: int, seed: int) -> EvalCells:
    """Latent-family cells on the panels and labels of ``cells[idx]``, binned as the collator bins real cells."""
    model, generator, rng = latent.model, torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    from ddsc.latent.flow import initial_noise

    genes, bins = [], []
    for start in range(0, len(idx), 64):
        rows = idx[start : start + 64]
        gene_ids, _, real = pad_cells([cells.genes[i] for i in rows], [cells.bins[i] for i in rows])
        cond = torch.from_numpy(cells.cond[rows]) if cells.cond.shape[1] else None
        z = model.sample_latents(initial_noise(len(rows), model.latent_shape, generator), cond, steps, 1.0)
        params = model.decode(z, gene_ids, model.sample_log_library(len(rows), generator))
        mu, theta = params.log_mu.double().exp().numpy(), params.log_theta.double().exp().numpy()
        counts = torch.from_numpy(np.where(real.numpy(), truncated_nb(mu, theta, rng), 0))
        drawn = collator.bins_for(counts, real)
        for r, i in enumerate(rows):
            genes.append(cells.genes[i])
            bins.append(drawn[r, : len(cells.genes[i])].numpy().astype(np.int64))
    return EvalCells([cells.cell_ids[i] for i in idx], genes, bins, cells.cond[idx], {})


def generation_scores(masked, latent, cells, train, collator, args) -> dict:
    from ddsc.eval.generation import dense, generate_bins, split_halves, top_genes

    a, b = split_halves(len(cells), args.seed)
    a, b = a[: args.gen_cells], b[: args.gen_cells]
    settings = SamplerSettings(steps=args.masked_steps, seed=args.seed)
    start = time.perf_counter()
    masked_cells = generate_bins(masked.model, cells, b, masked.tokens, settings, diffusion_cfg=masked.diffusion)
    masked_s = time.perf_counter() - start
    start = time.perf_counter()
    latent_cells = latent_panel_cells(latent, cells, b, collator, args.latent_steps, args.seed)
    latent_s = time.perf_counter() - start
    zero_bin = collator.binning.zero_fraction > 0
    columns = top_genes(cells, 1000)
    real_a, real_b = dense(cells, a, columns, zero_bin), dense(cells, b, columns, zero_bin)
    fit = dense(train, range(len(train)), columns, zero_bin)
    pca = PCA.fit(fit, n_components=min(50, len(train) - 1, len(columns)))
    out = {"reference": generation_metrics(real_a, real_b, pca, seed=args.seed)}
    for family, generated in (("masked", masked_cells), ("latent", latent_cells)):
        out[family] = generation_metrics(real_a, dense(generated, range(len(b)), columns, zero_bin), pca, args.seed)
    out["setup"] = {"real_a": len(a), "generated": len(b), "genes": len(columns), "pca_fit_cells": len(train)}
    out["wall_s"] = {"masked": masked_s, "latent": latent_s}
    return out


def masked_ce(masked, cells, train, args) -> dict:
    from ddsc.diffusion.masked_diffusion import MaskedDiffusion
    from ddsc.eval.baselines import GeneMarginalBaseline
    from ddsc.eval.masked import masked_prediction

    diffusion = MaskedDiffusion(masked.diffusion, masked.config.num_bins)
    marginal = GeneMarginalBaseline.fit(train.pairs(), masked.config.num_bins)
    batches = length_batches(cells, range(len(cells)), 64)
    results = masked_prediction(masked.model, diffusion, cells, batches, {"marginal": marginal.predict}, (0.15, 0.5))
    return {rate: {name: s.summary()["masked_ce"] for name, s in by.items()} for rate, by in results.bins.items()}


@torch.no_grad()
def nb_nll(latent, cells: EvalCells) -> dict:
    """NB NLL per gene of the eval cells' counts: decoding the posterior mean, and the prior mean z = 0."""
    from ddsc.latent.vae import log_library

    sums, n = {"posterior_mean": 0.0, "prior_mean": 0.0}, 0
    for start in range(0, len(cells), 64):
        rows = range(start, min(start + 64, len(cells)))
        genes, counts, valid = pad_cells([cells.genes[i] for i in rows], [cells.counts[i] for i in rows])
        layout = cell_layout(genes, valid, counts)
        gene_ids, counts, real = layout["gene_ids"], layout["counts"], layout["real"]
        mean = latent.model.encode(gene_ids, counts, layout["attention_mask"])
        for name, z in (("posterior_mean", mean), ("prior_mean", torch.zeros_like(mean))):
            params = latent.model.decode(z, gene_ids, log_library(counts, real))
            sums[name] -= float(torch.where(real, params.log_prob(counts), 0.0).sum())
        n += int(real.sum())
    return {name: s / n for name, s in sums.items()}


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


def _log_mean(latent, line: str, drug: str, dose: str, noise: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
    """Mean over the noise draws of the decoded log means of ``genes`` under the labels (library 1: it cancels in
    a delta, log mu being linear in log L)."""
    cond = latent.encode({"cell_line_id": [line], "drug": [drug], "dose": [dose]}, len(noise))
    z = latent.model.sample_latents(noise, cond)
    return latent.model.decode(z, genes, torch.zeros(len(noise))).log_mu.double().mean(0)


@torch.no_grad()
def latent_drug_effects(latent, truth, samples, draws: int = 16, seed: int = 0) -> dict:
    """Decoded log-mean deltas (drug minus control labels, the same flow noise) against the true log-rate effects."""
    model, labels = latent.model, latent.labels.labels
    genes = torch.from_numpy(truth.gene_ids)[None].expand(draws, -1)
    scores = []
    for li, line in enumerate(truth.cell_lines):
        control_doses = [str(s.get("dose", "")) for s in samples if s["cell_line_id"] == line and s["drug"] == CONTROL]
        if line not in labels["cell_line_id"] or not control_doses:
            continue
        noise = torch.randn((draws, *model.latent_shape), generator=torch.Generator().manual_seed(seed + li))

        control = _log_mean(latent, line, CONTROL, max(set(control_doses), key=control_doses.count), noise, genes)
        for di, drug in enumerate(truth.drugs):
            for ci, dose in enumerate(truth.doses):
                if drug == CONTROL or drug not in labels["drug"] or dose not in labels.get("dose", []):
                    continue
                delta = (_log_mean(latent, line, drug, dose, noise, genes) - control).numpy()
                scores.append(pearson(delta, truth.effect[li, di, ci]))
    return {"num_groups": len(scores), "mean_delta_pearson": float(np.nanmean(scores)) if scores else float("nan")}


def drug_effect_scores(masked, latent, collator, samples, mds: Path, args) -> dict:
    from ddsc.eval.drug_effects import DrugEffects, find_ground_truth
    from ddsc.eval.ground_truth import ground_truth_eval

    folder = find_ground_truth(mds)
    if folder is None:
        return {"skipped": "no demo ground truth beside the data"}
    truth = DrugEffects.load(folder)
    settings = SamplerSettings(steps=args.masked_steps, seed=args.seed)
    known = ground_truth_eval(
        masked.model,
        collator,
        samples,
        truth,
        settings,
        max_control_cells=args.truth_cells,
        sampled_control_cells=0,
        diffusion_cfg=masked.diffusion,
    )
    masked_metrics = known[0] if known is not None else {}
    return {
        "reference": masked_metrics.get("reference", {}).get("mean_delta_pearson", float("nan")),
        "masked": masked_metrics.get("expected", {}).get("mean_delta_pearson", float("nan")),
        "latent": latent_drug_effects(latent, truth, samples, seed=args.seed)["mean_delta_pearson"],
        "units": "masked: expected-bin deltas; latent: decoded log-mean deltas; reference: real mean-bin deltas",
    }


def score_dataset(name: str, mds: Path, hf_masked: Path, hf_latent: Path, args, stage: Callable[[str], None]) -> dict:

    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.score_threads)  # small models on a shared 2-core machine: spin waits dominate
    try:
        return _score(name, mds, hf_masked, hf_latent, args, stage)
    finally:
        torch.set_num_threads(threads)


def _score(name: str, mds: Path, hf_masked: Path, hf_latent: Path, args, stage: Callable[[str], None]) -> dict:
    from ddsc.eval.evaluate import read_mds
    from ddsc.inference import Predictor

    masked = Predictor.from_pretrained(hf_masked, progress=False)
    latent = Predictor.from_pretrained(hf_latent, progress=False)
    assert masked.family == "masked" and latent.family == "latent", (masked.family, latent.family)
    samples = read_mds(mds / "valid", args.eval_cells, args.seed)
    train_samples = read_mds(mds / "train", args.fit_cells, args.seed)
    collator = fresh_collator(masked.collator, args.seed)
    cells, train = collate_cells(collator, samples), collate_cells(collator, train_samples)
    out = {
        "params": {
            "masked": n_params(masked.model),
            "vae": n_params(latent.model.vae),
            "dit": n_params(latent.model.dit),
        },
        "eval_cells": len(cells),
    }
    stage(f"{name}: generation ({args.gen_cells} cells per family on held-out panels)")
    out["generation"] = generation_scores(masked, latent, cells, train, collator, args)
    stage(f"{name}: masked-bin CE and NB NLL")
    out["masked_ce"] = masked_ce(masked, cells, train, args)
    out["nb_nll"] = nb_nll(latent, cells)
    stage(f"{name}: embeddings ({min(args.embed_cells, len(samples))} cells)")
    out["embedding"] = embedding_scores(masked, latent, samples, args)
    stage(f"{name}: known drug effects")
    out["drug_effects"] = drug_effect_scores(masked, latent, collator, samples, mds, args)
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
    for rate, by in s["masked_ce"].items():
        rows.append((f"masked-bin CE @ {rate} (ref: marginal)", by["marginal"], by["model"], None))
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
