"""Write a synthetic dataset in the exact Tahoe-100M layout, with saved ground-truth drug effects.

Re-run with the same settings on a complete output, it does nothing (a done marker records the settings).

Example: python data_prep/make_demo_data.py --out demo_run/tahoe --cells 4000
"""

from __future__ import annotations

import argparse
import sys

from ddsc.data.demo_data import DemoSpec, make_demo_data_once
from ddsc.errors import run_reporting_errors


def main() -> None:
    spec = DemoSpec()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (data/, gene_metadata.parquet, ...)")
    parser.add_argument("--cells", type=int, default=spec.cells, help="number of cells (default %(default)s)")
    parser.add_argument("--genes", type=int, default=spec.genes, help="genes in the vocabulary (default %(default)s)")
    parser.add_argument("--cell-lines", type=int, default=spec.cell_lines, help="default %(default)s")
    parser.add_argument("--drugs", type=int, default=spec.drugs, help="drugs besides DMSO_TF (default %(default)s)")
    parser.add_argument("--doses", type=float, nargs="+", default=list(spec.doses), help="uM (default %(default)s)")
    parser.add_argument("--plates", type=int, default=spec.plates, help="default %(default)s")
    parser.add_argument("--shards", type=int, default=spec.shards, help="parquet files (default %(default)s)")
    parser.add_argument("--mean-library", type=float, default=spec.mean_library, help="mean UMIs per cell")
    parser.add_argument("--seed", type=int, default=spec.seed, help="default %(default)s")
    args = parser.parse_args()
    spec = DemoSpec(
        cells=args.cells,
        genes=args.genes,
        cell_lines=args.cell_lines,
        drugs=args.drugs,
        doses=tuple(args.doses),
        plates=args.plates,
        shards=args.shards,
        mean_library=args.mean_library,
        seed=args.seed,
    )
    wrote = make_demo_data_once(args.out, spec)
    print(
        f"{'wrote' if wrote else 'already complete, nothing to do:'} {spec.cells} cells x {spec.genes} genes "
        f"({spec.cell_lines} cell lines, {spec.drugs} drugs + DMSO_TF, {len(spec.doses)} doses, {spec.shards} shards) "
        f"in {args.out}"
    )


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
