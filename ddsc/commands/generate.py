"""Generate cells de novo for a gene panel and conditions (cell line, drug, dose), written as .h5ad bins."""

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
    parser.add_argument("--method", default="first_hitting", choices=METHODS)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1: none)")
    parser.add_argument("--gif", help="save the denoising trajectory of the first batch as this animated GIF")


def parse_genes(spec: str) -> list[str]:
    text = Path(spec[1:]).read_text() if spec.startswith("@") else spec.replace(",", "\n")
    return [line.strip() for line in text.splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    predictor = load_predictor(args)
    out = predictor.generate(
        parse_genes(args.genes),
        parse_conditions(args.condition),
        n_cells=args.n_cells,
        method=args.method,
        steps=args.steps,
        temperature=args.temperature,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        trajectory_gif=args.gif,
    )
    write_output(out, args.output)
    print(
        f"generated {out.n_obs:,} cells x {out.n_vars:,} genes ({out.uns['ddsc_generate']['nfe']} forward passes) "
        f"-> {args.output}" + (f", trajectory -> {args.gif}" if args.gif else "")
    )
    return 0
