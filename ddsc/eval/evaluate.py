"""Evaluate a model: masked prediction vs baselines, NELBO, generation and perturbation metrics, a report.

Usage: ``ddsc evaluate --model DIR --data MDS_DIR|X.h5ad --out REPORT_DIR``. Everything is seeded: the
evaluation cells, their fixed masks (the same for the model and the baselines), the NELBO noise and the
sampler, so two runs on the same model give the same numbers. The baselines are fitted on the train split
(MDS) or, for an .h5ad, on a seeded half of its cells (the other half is evaluated).

``metrics.json`` layout: ``setup``; ``masked.{rate}.{model|marginal|knn}`` (masked_ce, masked_acc,
masked_acc_pm1, ece, num_masked, and for every predictor ``confusion`` [true bin][predicted bin], for the
model also ``calibration``); ``margins.{rate}`` (baseline CE minus model CE, > 0 = model better); ``nelbo``;
``generation`` and ``perturbation`` with ``generated`` and ``reference`` (held-out real) values;
``ground_truth`` (demo data: the model's drug effects against the saved true ones, see
:mod:`ddsc.eval.ground_truth`) with ``expected`` (the model's conditional mean bins), ``generated`` (sampled
cells) and ``reference`` (real held-out cells) per "cell line|drug|dose" group, their means and per-dose means.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ddsc.commands.model_args import add_round_counts_argument
from ddsc.done import StepInputs
from ddsc.eval.masks import MASK_RATES
from ddsc.eval.settings import EvalSettings, SamplerSettings

if TYPE_CHECKING:  # torch-heavy modules are imported where used, so ``ddsc --help`` stays fast
    from ddsc.data.collator import CellCollator
    from ddsc.diffusion.masked_diffusion import MaskedDiffusion
    from ddsc.eval.report import ReportArrays
    from ddsc.inference import Predictor


def evaluate(
    model: Callable,
    collator: CellCollator,
    diffusion: MaskedDiffusion,
    train_samples: Sequence[dict],
    eval_samples: Sequence[dict],
    settings: EvalSettings,
) -> tuple[dict, ReportArrays]:
    """All metrics for ``model`` (a DiT-like denoiser in eval mode) on ``eval_samples`` (MDS-style dicts)."""
    from ddsc.data.tokens import ExpressionTokens
    from ddsc.eval.baselines import KNNBaseline
    from ddsc.eval.cells import collate_cells, fresh_collator, length_batches
    from ddsc.eval.generation import generation_eval, perturbation_eval
    from ddsc.eval.masked import masked_prediction, nelbo_grid
    from ddsc.eval.report import ReportArrays

    collator = fresh_collator(collator, settings.seed)
    tokens = ExpressionTokens(diffusion.num_bins)
    train = collate_cells(collator, train_samples)
    cells = collate_cells(collator, eval_samples)
    if not len(cells) or not len(train):
        raise ValueError(f"need train and evaluation cells, got {len(train)} train and {len(cells)} evaluation")
    knn = KNNBaseline.fit(train.pairs(), tokens.num_bins, k=settings.knn_k, alpha=settings.smoothing)
    baselines = {"marginal": knn.marginal.predict, "knn": knn.predict}
    batches = length_batches(cells, range(len(cells)), settings.batch_size)
    device = settings.device
    metrics: dict = {"setup": {"eval_cells": len(cells), "baseline_train_cells": len(train), "seed": settings.seed}}

    stats = masked_prediction(model, diffusion, cells, batches, baselines, settings.mask_rates, settings.seed, device)
    metrics["masked"] = {
        rate: {
            name: {
                **s.summary(),
                "confusion": s.confusion,
                **({"calibration": s.calibration()} if name == "model" else {}),
            }
            for name, s in by_name.items()
        }
        for rate, by_name in stats.items()
    }
    metrics["margins"] = {
        rate: {f"vs_{b}": m[b]["masked_ce"] - m["model"]["masked_ce"] for b in baselines}
        for rate, m in metrics["masked"].items()
    }
    if settings.nelbo_points:
        metrics["nelbo"] = nelbo_grid(model, diffusion, cells, batches, settings.nelbo_points, settings.seed, device)

    arrays = ReportArrays()
    if settings.generate_cells:
        zero_bin = collator.binning.zero_fraction > 0
        common = dict(
            max_cells=settings.generate_cells,
            max_genes=settings.max_genes,
            zero_bin=zero_bin,
            device=device,
            diffusion_cfg=diffusion.cfg,
        )
        metrics["generation"], arrays.pca_real, arrays.pca_generated = generation_eval(
            model, cells, tokens, settings.sampler, **common
        )
        pert = perturbation_eval(
            model,
            cells,
            tokens,
            settings.sampler,
            control=settings.control,
            min_cells=settings.min_group_cells,
            top_k=settings.top_k,
            **common,
        )
        if pert is not None:
            metrics["perturbation"], arrays.delta_real, arrays.delta_generated = pert
    if settings.ground_truth:
        from ddsc.eval.ground_truth import DrugEffects, ground_truth_eval

        known = ground_truth_eval(
            model,
            collator,
            eval_samples,
            DrugEffects.load(settings.ground_truth),
            settings.sampler,
            control=settings.control,
            max_control_cells=settings.truth_control_cells,
            sampled_control_cells=settings.truth_sampled_cells,
            min_obs=settings.truth_min_obs,
            device=device,
            diffusion_cfg=diffusion.cfg,
        )
        if known is None:
            reason = "the model has no drug condition, or no control cell of a ground-truth cell line was evaluated"
            metrics["ground_truth"] = {"source": settings.ground_truth, "skipped": reason}
        else:
            metrics["ground_truth"], arrays.truth_effect, arrays.truth_generated = known
    return metrics, arrays


# --------------------------------------------------------------------------------------------- data input


def read_mds(split_dir: Path, max_cells: int, seed: int) -> list[dict]:
    """Up to ``max_cells`` samples of one local MDS split folder, a seeded subset in index order.

    Read through ``StreamingDataset`` (unshuffled), like training, so compressed shards are handled.
    """
    import numpy as np

    from ddsc.data.checked_dataset import CheckedStreamingDataset

    if not (split_dir / "index.json").is_file():
        raise FileNotFoundError(f"{split_dir}: not an MDS split folder (no index.json)")
    dataset = CheckedStreamingDataset(local=str(split_dir), shuffle=False, batch_size=1)  # names a bad shard
    n = len(dataset)
    idx = range(n) if n <= max_cells else np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))
    return [dataset[int(i)] for i in idx]


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
        samples, matched = predictor.samples_from_anndata(adata, round_counts=round_counts)
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


# ------------------------------------------------------------------------------------------------------ CLI


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
    parser.add_argument("--sampler", default="first_hitting", choices=["ancestral", "first_hitting", "confidence"])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--max-genes", type=int, default=1000, help="genes used by the generation metrics")
    parser.add_argument("--top-k", type=int, default=50, help="top DE genes compared per (cell line, drug)")
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
        sampler=sampler,
        device=args.device,
        ground_truth=None if args.ground_truth is None else str(args.ground_truth),
        truth_control_cells=args.truth_control_cells,
        truth_sampled_cells=args.truth_sampled_cells,
    )


def summary_line(metrics: dict) -> str:
    parts = []
    for rate, m in metrics["masked"].items():
        parts.append(
            f"r={rate}: CE {m['model']['masked_ce']:.3f} (marginal {m['marginal']['masked_ce']:.3f}, "
            f"kNN {m['knn']['masked_ce']:.3f})"
        )
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    from ddsc.diffusion.masked_diffusion import MaskedDiffusion
    from ddsc.eval.ground_truth import find_ground_truth
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
    diffusion = MaskedDiffusion(predictor.diffusion, predictor.config.num_bins)
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
    metrics, arrays = evaluate(predictor.model, predictor.collator, diffusion, train, evaluation, settings)
    metrics["setup"].update({"model": str(args.model), "data": source, "settings": asdict(settings)})
    files = write_report(args.out, metrics, arrays)
    print(f"evaluated {len(evaluation)} cells in {time.perf_counter() - start:.0f}s: {summary_line(metrics)}")
    known = metrics.get("ground_truth", {})
    if "generated" in known:
        expected, sampled, reference = (known[k] for k in ("expected", "generated", "reference"))
        top = max(expected["by_dose"], key=float, default="")
        print(
            f"known drug effects ({known['source']}): delta Pearson of the model's expected bins "
            f"{expected['mean_delta_pearson']:.3f} (dose {top}: {expected['by_dose'].get(top, float('nan')):.3f}), "
            f"of sampled cells {sampled['mean_delta_pearson']:.3f}; real held-out cells "
            f"{reference['mean_delta_pearson']:.3f} (dose {top}: {reference['by_dose'].get(top, float('nan')):.3f})"
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
