"""Embed the cells of an .h5ad: obsm X_ddsc_cls (CLS state) and X_ddsc_mean (mean over gene positions)."""

from __future__ import annotations

import argparse

from ddsc.commands.model_args import add_model_arguments, load_predictor, read_input, write_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="input .h5ad with raw counts")
    add_model_arguments(parser)
    parser.add_argument("--layer", help="read counts from this layer instead of X")


def run(args: argparse.Namespace) -> int:
    predictor = load_predictor(args)
    out = predictor.embed(read_input(args.input), layer=args.layer, seed=args.seed)
    write_output(out, args.output)
    info = out.uns["ddsc_embed"]
    print(
        f"embedded {out.n_obs:,} cells ({info['empty_cells']} without a matched expressed gene; "
        f"{info['matched_genes']:,} of {info['genes']:,} genes in the vocabulary) -> {args.output}"
    )
    return 0
