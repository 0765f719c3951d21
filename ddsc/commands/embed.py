"""Embed the cells of an .h5ad. A masked-family model: obsm X_ddsc_labels (the model as a classifier over its
training labels, the embedding to use), X_ddsc_cls and X_ddsc_mean (untrained final states, for comparison); a
latent-family model: obsm X_ddsc_latent (the VAE posterior means). ``Predictor.embed`` / ``LatentPredictor.embed``
define each."""

from __future__ import annotations

import argparse

from ddsc.commands.model_args import add_input_arguments, add_model_arguments, load_cells, write_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    predictor, adata, options = load_cells(args)
    out = predictor.embed(adata, **options)
    write_output(out, args.output)
    info = out.uns["ddsc_embed"]
    print(
        f"embedded {out.n_obs:,} cells ({info['empty_cells']} without a matched expressed gene; "
        f"{info['matched_genes']:,} of {info['genes']:,} genes in the vocabulary) -> {args.output}"
    )
    return 0
