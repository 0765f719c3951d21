"""The MDS schema that every converter writes and every dataset reads.

Typed encodings only (no pickle): gene ids and raw integer counts of the cell's non-zero genes as int32
arrays, a globally unique cell id, and cell-level metadata as strings ("" where a source lacks a field).
"""

from __future__ import annotations

# Cell-level metadata kept from Tahoe-100M (``moa-fine`` is renamed to a valid identifier). AnnData / 10x
# sources fill what their ``obs`` has and leave the rest empty.
METADATA_COLUMNS: tuple[str, ...] = (
    "drug",
    "dose",  # concentration as a string, e.g. "0.5"; from sample_metadata.drugname_drugconc
    "dose_unit",  # e.g. "uM"
    "cell_line_id",
    "plate",
    "sample",
    "moa_fine",
    "canonical_smiles",
    "pubchem_cid",
    "barcode",
    "source",  # the input file the cell came from (basename)
)

MDS_COLUMNS: dict[str, str] = {
    "cell_id": "str",
    "genes": "ndarray:int32",  # gene token ids (never <cls>: the marker is stripped)
    "counts": "ndarray:int32",  # raw UMI counts, > 0, aligned with genes
    **{name: "str" for name in METADATA_COLUMNS},
}

# Written beside the split folders: sorted unique values of these columns over the whole dataset, so the
# condition-label vocabulary is known before training starts (no pass over the data needed).
LABELS_FILE = "labels.json"
LABEL_COLUMNS: tuple[str, ...] = ("cell_line_id", "drug", "dose", "plate", "moa_fine")
SUMMARY_FILE = "summary.json"
