"""Write a synthetic dataset in the exact Tahoe-100M layout, with saved ground-truth drug effects.

Re-run with the same settings on a complete output, it does nothing (a done marker records the settings).

Example: python data_prep/make_demo_data.py --out demo_run/tahoe --cells 4000
Unseen drugs and dose: --drugs 24 --held-out-drugs 4 keeps 4 drugs and the middle dose out of the cells
(their true effects stay in ground_truth/).
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
    parser.add_argument("--held-out-drugs", type=int, default=0, help="drugs whose cells are not written")
    parser.add_argument(
        "--held-out-dose",
        type=float,
        help="a dose whose cells are not written (default with --held-out-drugs: the middle dose)",
    )
    args = parser.parse_args()
    held_out_dose = args.held_out_dose
    if held_out_dose is None:
        held_out_dose = sorted(args.doses)[len(args.doses) // 2] if args.held_out_drugs and len(args.doses) > 2 else 0.0
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
        held_out_drugs=args.held_out_drugs,
        held_out_dose=held_out_dose,
    )
    wrote = make_demo_data_once(args.out, spec)
    print(
        f"{'wrote' if wrote else 'already complete, nothing to do:'} {spec.cells} cells x {spec.genes} genes "
        f"({spec.cell_lines} cell lines, {spec.drugs} drugs + DMSO_TF, {len(spec.doses)} doses, {spec.shards} shards) "
        f"in {args.out}"
        + (f"; held out: {spec.held_out_drugs} drugs, dose {spec.held_out_dose:g}" if spec.held_out_drugs else "")
    )


if __name__ == "__main__":
    sys.exit(run_reporting_errors(main))
