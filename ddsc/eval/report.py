"""Evaluation report: ``metrics.json``, PNG plots and a ``summary.md`` page that links them.

The metrics dict is the one :mod:`ddsc.eval.evaluate` builds (see its docstring for the layout). Plots (``plots``) are
drawn only for the sections present (no generation plot when generation was skipped). ``summary.md`` and
``metrics.json`` are written last, each atomically, so a folder holding them is a finished report.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ddsc.eval.plots import LABELS, PREDICTORS, ReportArrays, write_plots


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
        f"each drug and dose. Expected: the model's conditional mean, {known['expected_units']}. "
        f"Sampled: generated cells ({known['sampler']}, {known['steps']} "
        f"steps) on the {known['sampled_panels']} panels of {known['sampled_control_cells']} of those cells. "
        f"Reference: real held-out treated vs control cells.",
        "",
        "| | model, expected | model, sampled cells | reference (real) |",
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
    lines = ["", "| split (expected) | mean delta Pearson | groups |", "|---|---|---|"]
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
            + "). The same baselines from the seen drugs' true effects (what the seen drugs determine at all): "
            f"nearest {_fmt(base['ceiling_nearest_seen_drug_mean_delta_pearson'])}, "
            f"mean {_fmt(base['ceiling_mean_seen_drugs_mean_delta_pearson'])}.",
            "",
            "| unseen drug | model | nearest seen drug | mean of seen drugs | ceiling: nearest / mean |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {d} | {_fmt(v['model'])} | {_fmt(v['nearest_seen_drug'])} | {_fmt(v['mean_seen_drugs'])} | "
            f"{_fmt(v['ceiling_nearest_seen_drug'])} / {_fmt(v['ceiling_mean_seen_drugs'])} |"
            for d, v in base["by_unseen_drug"].items()
        ]
    return lines


def _summary(metrics: dict, plots: list[str]) -> str:
    lines = ["# DDSC evaluation", ""]
    lines += [f"- {k}: `{v}`" for k, v in metrics.get("setup", {}).items()]
    if metrics.get("masked"):
        lines += _masked_section(metrics["masked"], metrics["margins"])
    lines += _counts_section(metrics.get("imputation_counts", {}))
    if "reconstruction" in metrics:
        rec = metrics["reconstruction"]["nb_nll_per_gene"]
        lines += [
            "",
            f"VAE reconstruction, NB negative log-likelihood per gene: **{rec['posterior_mean']:.4f}** nats decoding "
            f"the posterior means, {rec['prior_mean']:.4f} decoding the prior mean (z = 0)",
        ]
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
    plots = write_plots(out, metrics, arrays or ReportArrays())
    _atomic_write(out / "summary.md", _summary(metrics, plots))
    _atomic_write(out / "metrics.json", json.dumps(_jsonable(metrics), indent=1))
    return [out / p for p in plots] + [out / "summary.md", out / "metrics.json"]
