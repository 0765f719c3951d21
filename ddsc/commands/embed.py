"""Embed the cells of an .h5ad: obsm X_ddsc_labels (the model as a classifier over its training labels, the
embedding to use), X_ddsc_cls and X_ddsc_mean (untrained final states, for comparison); ``Predictor.embed``
defines each."""

from __future__ import annotations

import argparse

from ddsc.commands.model_args import (
    add_cell_condition_arguments,
    add_input_arguments,
    add_model_arguments,
    cell_conditions,
    load_predictor,
    read_input,
    write_output,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    add_model_arguments(parser)
    add_cell_condition_arguments(parser)


def run(args: argparse.Namespace) -> int:
    predictor = load_predictor(args)
    adata = read_input(args.input)
    out = predictor.embed(
        adata, layer=args.layer, seed=args.seed, round_counts=args.round_counts, conditions=cell_conditions(args)
    )
    write_output(out, args.output)
    info = out.uns["ddsc_embed"]
    print(
        f"embedded {out.n_obs:,} cells ({info['empty_cells']} without a matched expressed gene; "
        f"{info['matched_genes']:,} of {info['genes']:,} genes in the vocabulary) -> {args.output}"
    )
    return 0
