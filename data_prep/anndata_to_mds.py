"""Convert AnnData (.h5ad), 10x directories (matrix.mtx) or 10x HDF5 (.h5) into MDS splits on a gene vocab.

Genes are mapped to the vocabulary by Ensembl id, falling back to a unique symbol (the matched counts are
printed and saved in summary.json). Raw integer counts are required. Cell metadata columns of the schema
(drug, dose, cell_line_id, plate, sample, ...) are taken from obs columns of the same name, or renamed with
--obs. Same layout, splits, resume and atomicity as tahoe_to_mds.py.

Example:
  python data_prep/anndata_to_mds.py --input pbmc.h5ad --vocab mds/tahoe/vocab.json --out mds/pbmc --obs drug=treatment
"""

from __future__ import annotations

import argparse
import sys

from ddsc.data.anndata_source import AnnDataSource, convert_anndata
from ddsc.data.mds_args import add_write_arguments, write_options
from ddsc.data.schema import METADATA_COLUMNS
from ddsc.data.vocab import GeneVocab
from ddsc.errors import run_reporting_errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+", help=".h5ad file(s), 10x .h5 file(s) or 10x directories")
    parser.add_argument("--vocab", required=True, help="gene vocab JSON (build_vocab.py, or vocab.json of a Tahoe MDS)")
    parser.add_argument("--layer", default="X", help="h5ad matrix: X, raw, or a name under layers/ (default X)")
    parser.add_argument(
        "--obs",
        nargs="*",
        default=[],
        metavar="COLUMN=OBS",
        help=f"take schema column COLUMN from obs column OBS; columns: {', '.join(METADATA_COLUMNS)}",
    )
    parser.add_argument("--round-counts", action="store_true", help="accept non-integer values by rounding them")
    add_write_arguments(parser)
    args = parser.parse_args()
    obs = dict(item.split("=", 1) for item in args.obs)
    unknown = sorted(set(obs) - set(METADATA_COLUMNS) | ({"barcode", "source"} & set(obs)))
    if unknown:
        parser.error(
            f"--obs: cannot set {unknown}; settable: {[c for c in METADATA_COLUMNS if c not in ('barcode', 'source')]}"
        )
    vocab = GeneVocab.from_json(args.vocab)
    source = AnnDataSource(vocab, layer=args.layer, obs_columns=obs, round_counts=args.round_counts)
    convert_anndata(args.input, vocab, args.out, source, write_options(args))


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
