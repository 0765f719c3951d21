"""Arguments shared by the commands that load an exported model (impute, generate, embed)."""

from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported model folder (ddsc export)")
    parser.add_argument("--output", required=True, help="output .h5ad")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    parser.add_argument("--batch-size", type=int, default=64, help="cells per forward pass")
    parser.add_argument("--seed", type=int, default=0)


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The input cells of impute and embed: raw counts, as data_prep requires (``ddsc.data.raw_counts``), and
    their conditions, from obs unless ``--condition`` / ``--null-conditions`` (``cell_conditions``)."""
    parser.add_argument("--input", required=True, help="input .h5ad with raw counts")
    parser.add_argument("--layer", help="read counts from this layer instead of X")
    add_round_counts_argument(parser)
    parser.add_argument(
        "--condition",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="condition of every cell instead of obs (repeatable; conditions not given are null)",
    )
    parser.add_argument(
        "--null-conditions", action="store_true", help="ignore obs: every condition null (unconditional)"
    )


def cell_conditions(args: argparse.Namespace) -> dict[str, list[str]] | None:
    """None (read obs) unless ``--condition`` or ``--null-conditions`` is given."""
    if args.null_conditions and args.condition:
        raise ValueError("--null-conditions and --condition exclude each other")
    return {} if args.null_conditions else parse_conditions(args.condition) if args.condition else None


def parse_conditions(items: list[str]) -> dict[str, list[str]]:
    conditions: dict[str, list[str]] = {}
    for item in items:
        column, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--condition {item!r}: expected NAME=VALUE")
        conditions[column.strip()] = [value.strip()]
    return conditions


def add_round_counts_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--round-counts",
        action="store_true",
        help="accept non-integer values by rounding them (default: refuse them, as data_prep does)",
    )


def load_predictor(args: argparse.Namespace):
    from ddsc.inference import Predictor

    return Predictor.from_pretrained(
        args.model, device=args.device, precision=args.precision, batch_size=args.batch_size
    )


def load_cells(args: argparse.Namespace):
    """impute and embed: the model, the input cells and the keyword arguments both tasks take from the flags."""
    options = {"layer": args.layer, "round_counts": args.round_counts, "seed": args.seed}
    return load_predictor(args), read_input(args.input), {**options, "conditions": cell_conditions(args)}


def read_input(path: str):
    import anndata

    return anndata.read_h5ad(path)


def write_output(adata, path: str) -> None:
    """Write under a temporary name and rename, so an interrupted run leaves no complete-looking file."""
    import os

    partial = f"{path}.partial"
    adata.write_h5ad(partial)
    os.replace(partial, path)
