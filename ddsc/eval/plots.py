"""The evaluation report's PNG plots, drawn only for the sections present (no generation plot when generation
was skipped), and the display names of the predictors they compare."""

from __future__ import annotations

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
    "ddsc_latent": "DDSC latent (VAE posterior means)",
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


def write_plots(out: Path, metrics: dict, arrays: ReportArrays) -> list[str]:
    """The PNGs of the sections present in ``metrics`` / ``arrays``, written into ``out``; their file names."""
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
    return plots
