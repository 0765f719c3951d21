"""The MDS schema that every converter writes and every dataset reads.

Typed encodings only (no pickle): gene ids of the cell's non-zero genes as an int32 array, their raw
integer counts as an unsigned 16-bit array (32-bit where needed, see ``COUNT_DTYPES``), a globally unique
cell id, and cell-level metadata as strings ("" where a source lacks a field).
"""

from __future__ import annotations

import numpy as np

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
    "counts": "ndarray",  # raw UMI counts, > 0, aligned with genes; dtype per cell: one of COUNT_DTYPES
    **{name: "str" for name in METADATA_COLUMNS},
}

# Counts are stored in the first of these that holds every count of the batch of cells (about 1,000) being
# converted: nearly always uint16, as single-gene UMI counts above 65,535 are rare. Against int32 that makes
# the raw shards 25% smaller and their zstd compression (the slowest step of a conversion) 25% faster. The
# column's dtype is dynamic, so a batch with a larger count keeps it exactly (int32) instead of losing it;
# readers cast (the collator does).
COUNT_DTYPES: tuple[type[np.integer], ...] = (np.uint16, np.int32)

# Written beside the split folders: sorted unique values of these columns over the whole dataset, so the
# condition-label vocabulary is known before training starts (no pass over the data needed), and so are the
# distinct SMILES and doses that molecule and scalar conditions check up front.
LABELS_FILE = "labels.json"
LABEL_COLUMNS: tuple[str, ...] = ("cell_line_id", "drug", "dose", "plate", "moa_fine", "canonical_smiles")
SUMMARY_FILE = "summary.json"
VOCAB_FILE = "vocab.json"  # the gene vocabulary (token id <-> Ensembl id <-> symbol), also beside the splits
