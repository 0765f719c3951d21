"""Readers for count matrices outside Tahoe: AnnData ``.h5ad``, 10x directories (``matrix.mtx``) and 10x HDF5.

Each format opens as a :class:`CountMatrix`: cells x features, features described by Ensembl id and
symbol, per-cell ``obs`` strings, and ``rows(start, stop)`` returning a CSR slice. h5ad (CSR or dense) and
10x HDF5 (stored CSC over genes x cells, i.e. CSR over cells) are sliced from disk, so memory stays bounded;
Matrix Market files are not random-access, so a 10x directory is read whole (fine at 10x-run scale).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import scipy.io
import scipy.sparse as sp


@dataclass
class CountMatrix:
    """One input matrix; ``rows`` returns ``(offsets, feature_index, values)`` for cells ``start:stop``."""

    path: str
    n_cells: int
    ensembl_ids: list[str]
    symbols: list[str]
    obs_names: list[str]
    obs: dict[str, list[str]] = field(default_factory=dict)
    _load: Callable[[], sp.csr_matrix] | None = None  # in-memory matrices (10x directory), read on first use
    _csr: sp.csr_matrix | None = None
    _file: h5py.File | None = None
    _x: object = None  # h5py group (CSR triplet) or dataset (dense)

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._load is not None and self._csr is None:
            self._csr = self._load()
        if self._csr is not None:
            chunk = self._csr[start:stop]
            return chunk.indptr.astype(np.int64), chunk.indices, chunk.data
        if isinstance(self._x, h5py.Dataset):  # dense X
            dense = self._x[start:stop]
            rows, cols = np.nonzero(dense)
            offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=stop - start))])
            return offsets, cols, dense[rows, cols]
        indptr = self._x["indptr"][start : stop + 1].astype(np.int64)
        lo, hi = indptr[0], indptr[-1]
        return indptr - lo, self._x["indices"][lo:hi], self._x["data"][lo:hi]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> CountMatrix:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_counts(path: str, layer: str = "X") -> CountMatrix:
    """Open ``path`` by its kind: a directory -> 10x mtx, ``.h5ad`` -> AnnData, ``.h5`` -> 10x HDF5."""
    if os.path.isdir(path):
        return _open_10x_dir(path)
    if path.endswith(".h5ad"):
        return _open_h5ad(path, layer)
    if path.endswith(".h5"):
        return _open_10x_h5(path)
    raise ValueError(f"{path}: unknown input kind (expected an .h5ad file, a 10x .h5 file or a 10x directory)")


def _read_lines(path: Path) -> list[list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def _find(folder: Path, *names: str) -> Path:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.exists():
                return candidate
    raise FileNotFoundError(f"{folder}: 10x directory lacks {' or '.join(names)}")


def _open_10x_dir(path: str) -> CountMatrix:
    folder = Path(path)
    features = _read_lines(_find(folder, "features.tsv", "genes.tsv"))
    barcodes = [row[0] for row in _read_lines(_find(folder, "barcodes.tsv"))]
    matrix_path = _find(folder, "matrix.mtx")

    def load() -> sp.csr_matrix:
        matrix = scipy.io.mmread(matrix_path)  # genes x cells
        if matrix.shape != (len(features), len(barcodes)):
            raise ValueError(
                f"{path}: matrix is {matrix.shape} (genes x cells) but {len(features)} features, "
                f"{len(barcodes)} barcodes"
            )
        return sp.csr_matrix(matrix.T)

    return CountMatrix(
        path=path,
        n_cells=len(barcodes),
        ensembl_ids=[row[0] for row in features],
        symbols=[row[1] if len(row) > 1 else "" for row in features],
        obs_names=barcodes,
        _load=load,
    )


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[()]]


def _open_10x_h5(path: str) -> CountMatrix:
    f = h5py.File(path, "r")
    if "matrix" in f:  # Cell Ranger >= 3
        group, features = f["matrix"], f["matrix"]["features"]
        ensembl, symbols = _strings(features["id"]), _strings(features["name"])
    else:  # Cell Ranger 2: one group per genome
        group = f[next(iter(f))]
        ensembl, symbols = _strings(group["genes"]), _strings(group["gene_names"])
    n_genes, n_cells = (int(v) for v in group["shape"][()])
    if n_genes != len(ensembl):
        raise ValueError(f"{path}: shape says {n_genes} genes but {len(ensembl)} features are listed")
    return CountMatrix(path, n_cells, ensembl, symbols, _strings(group["barcodes"]), _file=f, _x=group)


def _open_h5ad(path: str, layer: str) -> CountMatrix:
    from anndata.io import read_elem

    f = h5py.File(path, "r")
    key = {"X": "X", "raw": "raw/X"}.get(layer, f"layers/{layer}")
    if key not in f:
        f.close()
        raise KeyError(f"{path}: no {key!r} in the file (--layer takes X, raw or a name under layers/)")
    x = f[key]
    if isinstance(x, h5py.Group) and x.attrs.get("encoding-type") != "csr_matrix":
        f.close()
        raise ValueError(f"{path}: {key} is {x.attrs.get('encoding-type')}; save it as CSR (or dense) to stream it")
    obs = read_elem(f["obs"])
    var = read_elem(f["raw/var" if layer == "raw" else "var"])
    ensembl, symbols = var_features(var)
    n_cells = x.shape[0] if isinstance(x, h5py.Dataset) else int(x.attrs["shape"][0])
    obs_strings = {str(c): [_to_str(v) for v in obs[c].tolist()] for c in obs.columns}
    return CountMatrix(path, n_cells, ensembl, symbols, [str(i) for i in obs.index], obs_strings, _file=f, _x=x)


def _to_str(value: object) -> str:
    """obs values as strings: missing -> "", floats compact like Tahoe doses (0.5, 5 not 5.0)."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return format(value, "g") if isinstance(value, float) else str(value)


ENSEMBL_COLUMNS = ("gene_ids", "ensembl_id", "gene_id", "ensembl_ids")
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "gene_name", "symbol")


def var_features(var) -> tuple[list[str], list[str]]:
    """(Ensembl ids, symbols) of an AnnData ``var`` table; "" where unknown. The first column found of
    ``ENSEMBL_COLUMNS`` / ``SYMBOL_COLUMNS``, else the index: Ensembl ids when it looks like them (``ENS...``),
    otherwise symbols."""
    index = [str(v) for v in var.index]
    ensembl = _column(var, ENSEMBL_COLUMNS)
    if ensembl is None and index and all(v.startswith("ENS") for v in index[:100]):
        ensembl = index
    symbols = _column(var, SYMBOL_COLUMNS)
    if symbols is None:  # the index holds symbols unless it held the Ensembl ids
        symbols = [""] * len(index) if ensembl is index else index
    return ensembl or [""] * len(index), symbols


def _column(var, names: tuple[str, ...]) -> list[str] | None:
    for name in names:
        if name in var:
            return [str(v) for v in var[name]]
    return None
