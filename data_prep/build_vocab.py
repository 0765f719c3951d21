"""Build a gene vocabulary JSON: from Tahoe-100M gene_metadata.parquet (token ids preserved) or, for a
non-Tahoe corpus, from the features of an .h5ad / 10x input (numbered from 3 in feature order).

Examples:
  python data_prep/build_vocab.py --gene-metadata tahoe/gene_metadata.parquet --out vocab.json
  python data_prep/build_vocab.py --features data/mouse10k --out mouse_vocab.json
"""

from __future__ import annotations

import argparse
import sys

from ddsc.data.readers import open_counts
from ddsc.data.vocab import GeneVocab
from ddsc.errors import run_reporting_errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gene-metadata", help="Tahoe-100M gene_metadata.parquet (local path or URL)")
    source.add_argument("--features", help=".h5ad file, 10x .h5 file or 10x directory whose genes form the vocab")
    parser.add_argument("--out", required=True, help="output JSON")
    args = parser.parse_args()
    if args.gene_metadata:
        vocab = GeneVocab.from_gene_metadata(args.gene_metadata)
    else:
        with open_counts(args.features) as matrix:
            vocab = GeneVocab.from_features(matrix.ensembl_ids, matrix.symbols)
    vocab.to_json(args.out)
    print(f"wrote {vocab} to {args.out}")


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
