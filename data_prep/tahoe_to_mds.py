"""Convert Tahoe-100M parquet shards into MosaicML Streaming (MDS) train / valid / test splits.

Parallel over input files, streaming by row group (bounded memory per worker), resumable (re-run the same
command after a crash: finished inputs are skipped) and atomic (indexes are written last). Inputs may be a
directory, a glob, or an fsspec URL (hf://datasets/tahoebio/Tahoe-100M/data, s3://..., needs its backend).

Example:
  python data_prep/tahoe_to_mds.py --input tahoe/data --gene-metadata tahoe/gene_metadata.parquet \\
      --sample-metadata tahoe/sample_metadata.parquet --out mds/tahoe --workers 8
"""

from __future__ import annotations

import argparse
import sys

from ddsc.data.mds_args import add_write_arguments, write_options
from ddsc.data.tahoe import convert_tahoe
from ddsc.errors import run_reporting_errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="directory, glob or URL of expression shards (*.parquet)")
    parser.add_argument("--gene-metadata", required=True, help="gene_metadata.parquet (gene vocabulary)")
    parser.add_argument("--sample-metadata", help="sample_metadata.parquet (doses); without it dose stays empty")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows read at a time (default %(default)s)")
    add_write_arguments(parser)
    args = parser.parse_args()
    convert_tahoe(args.input, args.gene_metadata, args.out, args.sample_metadata, write_options(args), args.batch_size)


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
