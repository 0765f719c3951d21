"""Evaluation report: ``metrics.json``, PNG plots and a ``summary.md`` page that links them.

The metrics dict is the one :mod:`ddsc.eval.evaluate` builds (see its docstring for the layout). Plots are
drawn only for the sections present (no generation plot when generation was skipped). ``summary.md`` and
``metrics.json`` are written last, each atomically, so a folder holding them is a finished report.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: evaluation runs on headless nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PREDICTORS = ("model", "marginal", "knn", "cell_histogram", "gene_cell_product")
LABELS = {
    "model": "DDSC",
    "marginal": "per-gene marginal",
    "knn": "kNN",
    "cell_histogram": "cell histogram",
    "gene_cell_product": "gene x cell product",
    "gene_mean": "per-gene mean count",
    "knn_mean": "kNN mean count",
    "control_mean": "control mean",
    "perturbation_mean": "perturbation mean",
    "real_half": "real half (ceiling)",
    "ddsc_labels": "DDSC label likelihoods",
    "ddsc_cls": "DDSC CLS",
    "ddsc_mean": "DDSC mean-pooled",
    "pca50_log1p": "PCA-50 of log1p counts",
}


@dataclass
class ReportArrays:
    """Arrays behind the plots that are too large (or pointless) for metrics.json."""

    pca: dict[str, np.ndarray] | None = None  # "real" / "held_out" / "generated" -> [n, >=2] PCA coordinates
    delta_real: np.ndarray | None = None  # concatenated pseudobulk deltas over (cell line, drug) groups
    delta_generated: np.ndarray | None = None
    truth_effect: np.ndarray | None = None  # true log-rate effects, concatenated over ground-truth groups
    truth_generated: np.ndarray | None = None  # the model's expected-bin deltas on the same genes


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else str(value)  # strict JSON has no NaN / Infinity
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def plot_vs_mask_rate(masked: dict, path: Path) -> None:
    """Masked CE and accuracy vs mask rate, the model against every baseline."""
    rates = sorted(masked, key=float)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(
        axes,
        ("masked_ce", "masked_acc", "masked_acc_pm1"),
        ("masked CE (nats)", "masked accuracy", "within-one-bin"),
        strict=True,
    ):
        for name in PREDICTORS:
            if name in masked[rates[0]]:
                ax.plot([float(r) for r in rates], [masked[r][name][key] for r in rates], "o-", label=LABELS[name])
        ax.set_xlabel("mask rate")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_calibration(masked: dict, path: Path) -> None:
    """Reliability diagram of the model's argmax confidence, one curve per mask rate."""
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    for rate in sorted(masked, key=float):
        cal = masked[rate]["model"]["calibration"]
        ax.plot(
            cal["confidence"],
            cal["accuracy"],
            "o-",
            ms=3,
            label=f"mask {rate} (ECE {masked[rate]['model']['ece']:.3f})",
        )
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(confusion: np.ndarray, rate: str, path: Path) -> None:
    """Row-normalised confusion (true bin x predicted bin) of the model at one mask rate."""
    conf = np.asarray(confusion, dtype=np.float64)
    conf = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    image = ax.imshow(conf, origin="lower", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("predicted bin")
    ax.set_ylabel("true bin")
    ax.set_title(f"model confusion, mask rate {rate}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pca(coordinates: dict[str, np.ndarray], path: Path) -> None:
    """Real A, held-out real B and generated cells on the first two PCs of a separate fit set."""
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for name, label in (("real", "real (A)"), ("held_out", "held-out real (B)"), ("generated", "generated")):
        ax.scatter(coordinates[name][:, 0], coordinates[name][:, 1], s=4, alpha=0.5, label=label)
    ax.set_xlabel("PC1 (fitted on the baseline train cells)")
    ax.set_ylabel("PC2")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_delta_scatter(
    real: np.ndarray,
    generated: np.ndarray,
    path: Path,
    xlabel: str = "real delta vs control",
    diagonal: bool = True,
) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.scatter(real, generated, s=3, alpha=0.4)
    if diagonal:  # same units on both axes
        lim = float(max(np.abs(real).max(initial=0), np.abs(generated).max(initial=0))) or 1.0
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=1)
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("model delta vs control (bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _with_ci(value: float, interval) -> str:
    return f"{value:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"


def _masked_section(masked: dict, margins: dict) -> list[str]:
    lines = ["", "## Masked-bin prediction (same fixed masks for every predictor)", ""]
    lines += [
        "| mask rate | predictor | masked CE (nats) [95% CI over cells] | acc | acc +-1 | ECE |",
        "|---|---|---|---|---|---|",
    ]
    for rate in sorted(masked, key=float):
        for name in PREDICTORS:
            if name in masked[rate]:
                m = masked[rate][name]
                label = LABELS[name] + (" (best baseline)" if name == margins[rate]["best_baseline"] else "")
                ce = _with_ci(m["masked_ce"], m["masked_ce_ci95"])
                lines.append(
                    f"| {rate} | {label} | {ce} | "
                    + " | ".join(_fmt(m[k]) for k in ("masked_acc", "masked_acc_pm1", "ece"))
                    + " |"
                )
    lines += [
        "",
        "Margin: best baseline CE minus model CE (> 0: the model is better), with its paired 95% interval.",
        "",
        "| mask rate | model CE | best baseline | its CE | margin [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for rate in sorted(masked, key=float):
        best = margins[rate]["best_baseline"]
        margin = _with_ci(margins[rate]["vs_best"], margins[rate]["vs_best_ci95"])
        lines.append(
            f"| {rate} | {_fmt(masked[rate]['model']['masked_ce'])} | {LABELS[best]} | "
            f"{_fmt(masked[rate][best]['masked_ce'])} | {margin} |"
        )
    return lines


def _counts_section(counts: dict) -> list[str]:
    if not counts or not any(c.get("scores") for c in counts.values()):
        return []
    lines = ["", "## Imputation in count space (masked genes, log1p)", ""]
    lines += ["| mask rate | predictor | Pearson [95% CI] | Spearman |", "|---|---|---|---|"]
    for rate in sorted(counts, key=float):
        for name, m in counts[rate]["scores"].items():
            label = LABELS[name] + (" (best baseline)" if name == counts[rate]["best_baseline"] else "")
            lines.append(
                f"| {rate} | {label} | {_with_ci(m['pearson_log1p'], m['pearson_log1p_ci95'])} | "
                f"{_fmt(m['spearman_log1p'])} |"
            )
    return lines


def _perturbation_section(pert: dict | None) -> list[str]:
    if not pert:
        return []
    predictors = pert["predictors"]
    lines = [
        "",
        f"## Perturbation (cell-eval definitions; {pert['num_groups']} (cell line, treatment) groups vs "
        f"{pert['control']}, real half A as truth)",
        "",
        "Mean over groups [95% CI over groups]; overlap_at_k with k = " + str(pert["top_k"]) + ".",
        "",
        "| metric | " + " | ".join(LABELS[n] for n in predictors) + " |",
        "|---|" + "---|" * len(predictors),
    ]
    for metric in next(iter(predictors.values()))["mean"]:
        cells = [_with_ci(p["mean"][metric], p["ci95"][metric]) for p in predictors.values()]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return lines


def _embedding_section(embedding: dict | None) -> list[str]:
    if not embedding:
        return []
    lines = ["", "## Embeddings (leave-one-out kNN accuracy, k-means ARI)", ""]
    lines += ["| label | embedding | kNN accuracy [95% CI] | ARI |", "|---|---|---|---|"]
    for column, scores in embedding.items():
        for name, m in scores.items():
            if isinstance(m, dict):
                lines.append(
                    f"| {column} ({scores['num_labels']} labels, majority {scores['majority_fraction']:.3f}) | "
                    f"{LABELS.get(name, name)} | {_with_ci(m['knn_accuracy'], m['knn_accuracy_ci95'])} | "
                    f"{_fmt(m['ari'])} |"
                )
    return lines


def _ground_truth_section(known: dict | None) -> list[str]:
    if not known:
        return []
    lines = ["", "## Known drug effects (demo ground truth)", ""]
    if "skipped" in known:
        return lines + [f"Skipped: {known['skipped']}."]
    exp, gen, ref = known["expected"], known["generated"], known["reference"]
    lines += [
        f"Pearson over genes between the true log-rate effect vs DMSO_TF and the bin delta, per (cell line, drug, "
        f"dose), on {known['panels']} gene panels of {known['control_cells']} real control cells relabelled with "
        f"each drug and dose. Expected: the model's conditional mean bin (all bins masked, t = 1: the distribution "
        f"the first generation step samples from). Sampled: generated cells ({known['sampler']}, {known['steps']} "
        f"steps) on the {known['sampled_panels']} panels of {known['sampled_control_cells']} of those cells. "
        f"Reference: real held-out treated vs control cells.",
        "",
        "| | model, expected bins | model, sampled cells | reference (real) |",
        "|---|---|---|---|",
    ]
    rows = [
        ("mean delta Pearson", "mean_delta_pearson"),
        ("sign agreement, genes with abs effect > 0.5", "mean_sign_agreement_strong"),
    ]
    lines += [f"| {name} | {_fmt(exp[k])} | {_fmt(gen[k])} | {_fmt(ref[k])} |" for name, k in rows]
    lines.append(f"| groups | {exp['num_groups']} | {gen['num_groups']} | {ref['num_groups']} |")
    lines += [
        f"| delta Pearson at dose {d} | {_fmt(v)} | {_fmt(gen['by_dose'].get(d, float('nan')))} | "
        f"{_fmt(ref['by_dose'].get(d, float('nan')))} |"
        for d, v in exp["by_dose"].items()
    ]
    return lines + _split_section(exp)


def _split_section(exp: dict) -> list[str]:
    """Expected-bin delta Pearson by seen / unseen drug / unseen dose, and the unseen drugs' baselines."""
    if len(exp.get("by_split", {})) < 2 and not exp.get("baselines"):
        return []
    lines = ["", "| split (expected bins) | mean delta Pearson | groups |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(v['mean_delta_pearson'])} | {v['num_groups']} |" for k, v in exp["by_split"].items()]
    base = exp.get("baselines")
    if base:
        lines += [
            "",
            f"Unseen drugs ({base['unseen_drug_groups']} groups) against the model's own deltas for seen drugs: "
            f"model {_fmt(base['model_mean_delta_pearson'])}, nearest seen drug by Tanimoto "
            f"{_fmt(base['nearest_seen_drug_mean_delta_pearson'])}, mean of seen drugs "
            f"{_fmt(base['mean_seen_drugs_mean_delta_pearson'])} (nearest: "
            + ", ".join(f"{d} -> {n}" for d, n in base["nearest_seen_drug_of"].items())
            + ").",
        ]
    return lines


def _summary(metrics: dict, plots: list[str]) -> str:
    lines = ["# DDSC evaluation", ""]
    lines += [f"- {k}: `{v}`" for k, v in metrics.get("setup", {}).items()]
    if metrics.get("masked"):
        lines += _masked_section(metrics["masked"], metrics["margins"])
    lines += _counts_section(metrics.get("imputation_counts", {}))
    if "nelbo" in metrics:
        lines += ["", f"NELBO per real token on a fixed t grid: **{metrics['nelbo']['nelbo']:.4f}** nats"]
    if "generation" in metrics:
        gen, ref = metrics["generation"]["generated"], metrics["generation"]["reference"]
        lines += ["", "## Generation (generated vs real A; reference: held-out real B vs real A)", ""]
        lines += ["| metric | generated | reference |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(v)} | {_fmt(ref[k])} |" for k, v in gen.items()]
    lines += _perturbation_section(metrics.get("perturbation"))
    lines += _embedding_section(metrics.get("embedding"))
    lines += _ground_truth_section(metrics.get("ground_truth"))
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "All numbers: [metrics.json](metrics.json)", ""]
    return "\n".join(lines)


def write_report(out_dir: str | Path, metrics: dict, arrays: ReportArrays | None = None) -> list[Path]:
    """Write plots, ``summary.md`` and ``metrics.json`` into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = arrays or ReportArrays()
    plots = []
    masked = metrics.get("masked", {})
    if masked:
        plot_vs_mask_rate(masked, out / "mask_rate.png")
        plots.append("mask_rate.png")
        if "calibration" in next(iter(masked.values())).get("model", {}):
            plot_calibration(masked, out / "calibration.png")
            plots.append("calibration.png")
        mid = sorted(masked, key=float)[len(masked) // 2]
        if "confusion" in masked[mid].get("model", {}):
            plot_confusion(masked[mid]["model"]["confusion"], mid, out / "confusion.png")
            plots.append("confusion.png")
    if arrays.pca is not None:
        plot_pca(arrays.pca, out / "pca.png")
        plots.append("pca.png")
    if arrays.delta_real is not None and arrays.delta_generated is not None and arrays.delta_real.size:
        plot_delta_scatter(arrays.delta_real, arrays.delta_generated, out / "delta_scatter.png")
        plots.append("delta_scatter.png")
    if arrays.truth_effect is not None and arrays.truth_generated is not None and arrays.truth_effect.size:
        plot_delta_scatter(
            arrays.truth_effect,
            arrays.truth_generated,
            out / "ground_truth_scatter.png",
            xlabel="true drug effect (log-rate vs DMSO_TF)",
            diagonal=False,
        )
        plots.append("ground_truth_scatter.png")
    _atomic_write(out / "summary.md", _summary(metrics, plots))
    _atomic_write(out / "metrics.json", json.dumps(_jsonable(metrics), indent=1))
    return [out / p for p in plots] + [out / "summary.md", out / "metrics.json"]
