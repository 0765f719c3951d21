"""Generate cells de novo for a gene panel and conditions (cell line, drug, dose), written as .h5ad.

A masked-family model writes expression bins (its sampler: ``--method``, ``--temperature``, ``--gif``); a
latent-family model writes counts drawn from its NB decoder (``ddsc.inference.latent``) and refuses those
sampler options, which mean nothing for a rectified flow, rather than ignore them silently.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ddsc.commands.model_args import add_model_arguments, load_predictor, parse_conditions, write_output
from ddsc.diffusion.sampler_names import METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--genes", required=True, help="gene panel: comma-separated ids/symbols, or @file (one a line)")
    parser.add_argument("--n-cells", type=int, default=100)
    parser.add_argument(
        "--condition",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="e.g. --condition cell_line_id=CVCL_0023 --condition drug=DMSO_TF; for a molecule model "
        "--condition smiles='CC(=O)Oc1ccccc1C(=O)O' --condition dose=0.5 (any SMILES, any dose; repeatable)",
    )
    parser.add_argument("--method", choices=METHODS, help="masked family only (default first_hitting)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: masked 32, latent its sampler_steps)")
    parser.add_argument("--temperature", type=float, help="masked family only (default 1)")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1: none)")
    parser.add_argument("--gif", help="masked family only: save the first batch's denoising as this animated GIF")


def parse_genes(spec: str) -> list[str]:
    text = Path(spec[1:]).read_text() if spec.startswith("@") else spec.replace(",", "\n")
    return [line.strip() for line in text.splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    predictor = load_predictor(args)
    genes, conditions = parse_genes(args.genes), parse_conditions(args.condition)
    common = {"n_cells": args.n_cells, "guidance_scale": args.guidance_scale, "seed": args.seed}
    if predictor.family == "latent":
        masked_only = [("--method", args.method), ("--temperature", args.temperature), ("--gif", args.gif)]
        given = [flag for flag, value in masked_only if value is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)}: masked-family sampler options, but {args.model} is a latent-family model "
                "(rectified flow: use --steps and --guidance-scale)"
            )
        out = predictor.generate(genes, conditions, steps=args.steps, **common)
    else:
        out = predictor.generate(
            genes,
            conditions,
            method=args.method or "first_hitting",
            steps=args.steps or 32,
            temperature=1.0 if args.temperature is None else args.temperature,
            trajectory_gif=args.gif,
            **common,
        )
    write_output(out, args.output)
    what = "counts" if predictor.family == "latent" else "bins"
    print(
        f"generated {out.n_obs:,} cells x {out.n_vars:,} genes of {what} ({out.uns['ddsc_generate']['nfe']} forward "
        f"passes) -> {args.output}" + (f", trajectory -> {args.gif}" if args.gif else "")
    )
    return 0
