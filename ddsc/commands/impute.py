"""Impute (inpaint) hidden entries of an .h5ad: by fraction, by a mask layer or by gene list.

Adds layers ddsc_mask (hidden entries), ddsc_bins (observed and predicted bins) and ddsc_imputed (counts, with
the predicted bin's representative count at hidden entries: one answer in both layers). Observed entries are
never changed; conditions come from obs unless --condition / --null-conditions is given.
"""

from __future__ import annotations

import argparse

from ddsc.commands.model_args import add_input_arguments, add_model_arguments, load_cells, write_output
from ddsc.diffusion.sampler_names import METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--mask-fraction", type=float, help="hide this fraction of each cell's non-zero entries")
    parser.add_argument("--mask-layer", help="boolean layer of entries to hide")
    parser.add_argument("--genes", help="comma-separated var names to hide (and predict) in every cell")
    parser.add_argument("--method", default="argmax", choices=["argmax", *METHODS])
    parser.add_argument("--steps", type=int, default=16, help="sampler steps (not used by argmax)")
    parser.add_argument("--temperature", type=float, default=1.0)


def run(args: argparse.Namespace) -> int:
    predictor, adata, options = load_cells(args)
    genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else None
    if args.mask_layer and args.mask_layer not in adata.layers:
        raise ValueError(f"--mask-layer {args.mask_layer!r}: {args.input} has layers {list(adata.layers) or 'none'}")
    out = predictor.impute(
        adata,
        mask_fraction=args.mask_fraction,
        mask=adata.layers[args.mask_layer] if args.mask_layer else None,
        genes=genes,
        method=args.method,
        steps=args.steps,
        temperature=args.temperature,
        **options,
    )
    write_output(out, args.output)
    info = out.uns["ddsc_impute"]
    print(
        f"imputed {info['hidden_entries']:,} entries in {out.n_obs:,} cells "
        f"({info['matched_genes']:,} of {info['genes']:,} genes in the vocabulary) -> {args.output}"
    )
    return 0
