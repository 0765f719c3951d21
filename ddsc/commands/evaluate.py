"""Evaluate a model: masked prediction and count imputation vs baselines, NELBO, generation, perturbation
and embedding metrics, a report.

Usage: ``ddsc evaluate --model DIR --data MDS_DIR|X.h5ad --out REPORT_DIR``, for a model of either family
(``ddsc.eval.evaluate_latent`` says what a latent model's report holds). Everything is seeded: two runs on
the same model give the same numbers. The baselines are fitted on the train split (MDS) or, for an .h5ad, on
a seeded half of its cells (the other half is evaluated). The metrics and the ``metrics.json`` layout:
``ddsc.eval.evaluate``. A report already written from the same model, data and settings is left as it is.
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import asdict
from pathlib import Path

from ddsc.commands.model_args import add_round_counts_argument
from ddsc.diffusion.sampler_names import METHODS
from ddsc.done import StepInputs
from ddsc.eval.evaluate import embed_samples, evaluate, load_data
from ddsc.eval.evaluate_latent import evaluate_latent
from ddsc.eval.masks import MASK_RATES
from ddsc.eval.settings import EvalSettings, SamplerSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported model folder (ddsc export)")
    parser.add_argument(
        "--data", required=True, type=Path, help="MDS dataset folder (with train/ and valid/ or test/) or .h5ad"
    )
    parser.add_argument("--out", required=True, type=Path, help="report folder (metrics.json, plots, summary.md)")
    parser.add_argument("--split", default=None, help="MDS split to evaluate (default: test if present, else valid)")
    parser.add_argument("--train-split", default="train", help="MDS split the baselines are fitted on")
    parser.add_argument("--max-cells", type=int, default=2000, help="evaluation cells (seeded subset)")
    parser.add_argument("--max-train-cells", type=int, default=5000, help="cells to fit the baselines on")
    parser.add_argument(
        "--baseline-fraction", type=float, default=0.5, help=".h5ad input: share of cells fitting the baselines"
    )
    parser.add_argument("--mask-rates", default=",".join(f"{r:g}" for r in MASK_RATES), help="comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--knn-k", type=int, default=10)
    parser.add_argument("--nelbo-points", type=int, default=10, help="t grid size (0 skips)")
    parser.add_argument("--generate-cells", type=int, default=256, help="cells generated per half (0 skips generation)")
    parser.add_argument("--sampler", default="first_hitting", choices=METHODS)
    parser.add_argument("--steps", type=int, default=32, help="sampler steps (a latent model: Euler steps of its flow)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--max-genes", type=int, default=1000, help="genes used by the generation metrics")
    parser.add_argument("--top-k", type=int, default=50, help="perturbation: k of overlap_at_k (top DE genes)")
    parser.add_argument(
        "--min-group-cells",
        type=int,
        default=3,
        help="perturbation: cells a (cell line, treatment) group needs in each half (and controls per cell line)",
    )
    parser.add_argument(
        "--ground-truth",
        type=Path,
        default=None,
        help="demo ground_truth/ folder (known drug effects) to score conditional generation against; default: "
        "DATA/ground_truth or, in the demo layout, DATA/../tahoe/ground_truth when present",
    )
    parser.add_argument(
        "--truth-control-cells",
        type=int,
        default=16,
        help="ground truth: control cells per cell line whose gene panels are scored under every (drug, dose)",
    )
    parser.add_argument(
        "--truth-sampled-cells",
        type=int,
        default=4,
        help="ground truth: of these, control cells per cell line whose panels are also sampled (0: none)",
    )
    parser.add_argument(
        "--embed-labels",
        default="",
        help="comma-separated label columns (obs columns of an .h5ad) to score `ddsc embed` embeddings with; "
        "default: cell_line_id, drug and dose where present",
    )
    parser.add_argument("--device", default="cpu")
    add_round_counts_argument(parser)  # .h5ad input


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    rates = tuple(float(r) for r in args.mask_rates.split(","))
    sampler = SamplerSettings(
        args.sampler, args.steps, args.temperature, args.guidance_scale, args.batch_size, args.seed
    )
    return EvalSettings(
        mask_rates=rates,
        seed=args.seed,
        batch_size=args.batch_size,
        knn_k=args.knn_k,
        nelbo_points=args.nelbo_points,
        generate_cells=args.generate_cells,
        max_genes=args.max_genes,
        top_k=args.top_k,
        min_group_cells=args.min_group_cells,
        sampler=sampler,
        device=args.device,
        ground_truth=None if args.ground_truth is None else str(args.ground_truth),
        truth_control_cells=args.truth_control_cells,
        truth_sampled_cells=args.truth_sampled_cells,
        embed_labels=tuple(c for c in args.embed_labels.split(",") if c),
    )


def summary_line(metrics: dict) -> str:
    """The masked-bin CE margins per mask rate or, for a model without bins, the count-imputation Pearson."""
    parts = []
    if "masked" not in metrics:
        for rate, c in metrics["imputation_counts"].items():
            best = c["best_baseline"]
            parts.append(
                f"r={rate}: imputed-count Pearson {c['scores']['model']['pearson_log1p']:.3f} (best baseline {best} "
                f"{c['scores'][best]['pearson_log1p']:.3f})"
            )
        return "; ".join(parts)
    for rate, m in metrics["masked"].items():
        margin = metrics["margins"][rate]
        best = margin["best_baseline"]
        low, high = margin["vs_best_ci95"]
        parts.append(
            f"r={rate}: CE {m['model']['masked_ce']:.3f} (best baseline {best} {m[best]['masked_ce']:.3f}, "
            f"margin {margin['vs_best']:+.3f} [{low:+.3f}, {high:+.3f}])"
        )
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    from ddsc.diffusion.masked_diffusion import MaskedDiffusion
    from ddsc.eval.drug_effects import find_ground_truth
    from ddsc.eval.report import write_report
    from ddsc.inference import Predictor

    settings = settings_from_args(args)
    if settings.ground_truth is None and args.data.suffix != ".h5ad":
        found = find_ground_truth(args.data)
        settings.ground_truth = None if found is None else str(found)
    inputs = report_inputs(args, settings)
    if inputs.done_in(args.out):
        print(f"{args.out} is up to date with its model, data and settings; nothing to do")
        return 0
    inputs.begin(args.out)
    start = time.perf_counter()
    predictor = Predictor.from_pretrained(args.model, device=settings.device)
    train, evaluation, source = load_data(
        args.data,
        predictor,
        args.split,
        args.train_split,
        settings,
        args.max_cells,
        args.max_train_cells,
        args.baseline_fraction,
        args.round_counts,
    )
    embed = functools.partial(embed_samples, predictor, seed=settings.seed)
    if predictor.family == "latent":
        if predictor.collator is None:
            raise ValueError(f"--model {args.model}: the export has no binning of its data; export it again")
        metrics, arrays = evaluate_latent(predictor.model, predictor.collator, train, evaluation, settings, embed)
    else:
        diffusion = MaskedDiffusion(predictor.diffusion, predictor.config.num_bins)
        metrics, arrays = evaluate(predictor.model, predictor.collator, diffusion, train, evaluation, settings, embed)
    setup = {"model": str(args.model), "family": predictor.family, "data": source, "settings": asdict(settings)}
    metrics["setup"].update(setup)
    files = write_report(args.out, metrics, arrays)
    print(f"evaluated {len(evaluation)} cells in {time.perf_counter() - start:.0f}s: {summary_line(metrics)}")
    known = metrics.get("ground_truth", {})
    if "generated" in known:
        expected, sampled, reference = (known[k] for k in ("expected", "generated", "reference"))
        top = max(expected["by_dose"], key=float, default="")
        print(
            f"known drug effects ({known['source']}): delta Pearson of the model's expected values "
            f"{expected['mean_delta_pearson']:.3f} (dose {top}: {expected['by_dose'].get(top, float('nan')):.3f}), "
            f"of sampled cells {sampled['mean_delta_pearson']:.3f}; real held-out cells "
            f"{reference['mean_delta_pearson']:.3f} (dose {top}: {reference['by_dose'].get(top, float('nan')):.3f})"
        )
        splits = expected.get("by_split", {})
        if len(splits) > 1:
            print("  by split: " + ", ".join(f"{k} {v['mean_delta_pearson']:.3f}" for k, v in splits.items()))
        if expected.get("baselines"):
            base = expected["baselines"]
            print(
                f"  unseen drugs: model {base['model_mean_delta_pearson']:.3f}, nearest seen drug "
                f"{base['nearest_seen_drug_mean_delta_pearson']:.3f}, mean of seen drugs "
                f"{base['mean_seen_drugs_mean_delta_pearson']:.3f}"
            )
    print(f"report: {files[-2]} ({len(files)} files in {args.out})")
    inputs.mark_done(args.out)
    return 0


def report_inputs(args: argparse.Namespace, settings: EvalSettings) -> StepInputs:
    """What a report depends on: the model folder, the data (an .h5ad, or the MDS split indexes), the ground
    truth and every setting, so an unchanged re-run is skipped (``ddsc.done``)."""
    data = [args.data] if args.data.suffix == ".h5ad" else sorted(args.data.glob("*/index.json"))
    chosen = {k: v for k, v in vars(args).items() if k not in ("out", "command") and not k.startswith("_")}
    return StepInputs.of([args.model, *data, settings.ground_truth], {**chosen, **asdict(settings)})
