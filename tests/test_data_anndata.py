"""AnnData / 10x -> MDS: mouse10k (10x directory), a 10x HDF5 written here, h5ad layers, obs, raw-count checks."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from data_prep_helpers import read_all

from ddsc.data.anndata_source import AnnDataSource, convert_anndata, map_features
from ddsc.data.mds_convert import ConversionError, WriteOptions
from ddsc.data.raw_counts import NotRawCountsError
from ddsc.data.splits import SplitSpec
from ddsc.data.vocab import GeneVocab

MOUSE = Path(__file__).parent / "data" / "mouse10k"
OPTIONS = WriteOptions(split=SplitSpec(valid_fraction=0.1), shard_size=1 << 18)


def _mouse():
    with gzip.open(MOUSE / "features.tsv.gz", "rt") as f:
        features = [line.split("\t") for line in f.read().splitlines()]
    with gzip.open(MOUSE / "barcodes.tsv.gz", "rt") as f:
        barcodes = f.read().split()
    counts = sp.csr_matrix(scipy.io.mmread(MOUSE / "matrix.mtx.gz").T)
    return [f[0] for f in features], [f[1] for f in features], barcodes, counts


def _expected(counts: sp.csr_matrix, tokens: np.ndarray, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cell_id -> (genes, counts) computed with scipy, mapping features through ``tokens`` (-1 dropped)."""
    out = {}
    for i in range(counts.shape[0]):
        row = counts.getrow(i)
        keep = (tokens[row.indices] >= 0) & (row.data > 0)
        if keep.any():
            out[f"{name}:{i}"] = (tokens[row.indices[keep]], row.data[keep])
    return out


def _check(cells: dict, expected: dict) -> None:
    assert cells.keys() == expected.keys()
    for cell_id, (genes, counts) in expected.items():
        assert np.array_equal(cells[cell_id]["genes"], genes) and np.array_equal(cells[cell_id]["counts"], counts)


def test_mouse10k_directory_round_trips(tmp_path):
    ensembl, symbols, barcodes, counts = _mouse()
    vocab = GeneVocab.from_features(ensembl, symbols)
    source = AnnDataSource(vocab, chunk_size=3000)
    summary = convert_anndata([str(MOUSE)], vocab, str(tmp_path / "mds"), source, OPTIONS)
    cells = read_all(tmp_path / "mds")
    expected = _expected(counts, np.arange(3, 3 + len(ensembl)), "mouse10k")
    _check(cells, expected)
    empty = int(np.count_nonzero(counts.getnnz(axis=1) == 0))
    assert summary["cells_rejected"] == ({"empty_cell": empty} if empty else {})
    assert summary["feature_mapping"]["mouse10k"]["matched_by_ensembl"] == 1000
    assert cells["mouse10k:5"]["barcode"] == barcodes[5] and cells["mouse10k:5"]["source"] == "mouse10k"


def _write_10x_h5(
    path: Path, counts: sp.csr_matrix, ensembl: list[str], symbols: list[str], barcodes: list[str]
) -> None:
    """Cell Ranger v3 layout: genes x cells stored CSC, i.e. the cells x genes CSR arrays."""
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = counts.data.astype(np.int32), counts.indices, counts.indptr
        m["shape"] = np.array([counts.shape[1], counts.shape[0]])
        m["barcodes"] = np.array(barcodes, dtype="S")
        feats = m.create_group("features")
        feats["id"], feats["name"] = np.array(ensembl, dtype="S"), np.array(symbols, dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * len(ensembl), dtype="S")


def test_10x_h5_maps_onto_another_vocab_by_ensembl_then_symbol(tmp_path):
    ensembl, symbols, barcodes, counts = _mouse()
    counts, barcodes = counts[:1500], barcodes[:1500]
    # A vocab that knows 300 genes by Ensembl id (versioned), 100 by symbol only, and not the rest.
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ensembl))
    by_id, by_symbol = order[:300], order[300:400]
    vocab = GeneVocab(
        token_ids=np.arange(10, 410) * 2,
        ensembl_ids=[f"{ensembl[i]}.3" for i in by_id] + [f"ENSOTHER{i}" for i in by_symbol],
        symbols=[f"x{i}" for i in by_id] + [symbols[i] for i in by_symbol],
    )
    unique_symbol = {s for s in symbols if symbols.count(s) == 1}
    tokens = vocab.ids_for(ensembl, symbols)
    assert (tokens[by_id] >= 0).all()
    assert all((tokens[i] >= 0) == (symbols[i] in unique_symbol) for i in by_symbol)
    _write_10x_h5(tmp_path / "sample.h5", counts, ensembl, symbols, barcodes)
    summary = convert_anndata(
        [str(tmp_path / "sample.h5")], vocab, str(tmp_path / "mds"), AnnDataSource(vocab, chunk_size=400), OPTIONS
    )
    mapping = summary["feature_mapping"]["sample.h5"]
    assert mapping["matched_by_ensembl"] == 300 and mapping["matched_by_symbol"] == int((tokens[by_symbol] >= 0).sum())
    expected = _expected(counts, tokens, "sample.h5")
    _check(read_all(tmp_path / "mds"), expected)
    # every stored entry of an unmatched feature is counted (explicit zeros are not stored in this matrix)
    assert summary["gene_entries_dropped"]["unknown_gene"] == int(np.count_nonzero(tokens[counts.indices] < 0))


def _h5ad(tmp_path: Path, x, layers=None) -> Path:
    ensembl, symbols, barcodes, counts = _mouse()
    n = x.shape[0]
    obs = pd.DataFrame(
        {"treatment": ["drugA", "DMSO_TF"] * (n // 2), "dose": [0.5, 0.0] * (n // 2)}, index=barcodes[:n]
    )
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame({"gene_ids": ensembl}, index=symbols), layers=layers or {})
    adata.var_names_make_unique()
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return path


def test_h5ad_counts_layer_and_obs_columns(tmp_path):
    ensembl, symbols, _, counts = _mouse()
    counts = counts[:600].astype(np.float32)
    normalised = sp.csr_matrix(np.log1p(counts.toarray() / 7.0))
    path = _h5ad(tmp_path, normalised, layers={"counts": counts})
    vocab = GeneVocab.from_features(ensembl, symbols)
    with pytest.raises(ConversionError, match="raw integer counts are required"):
        convert_anndata([str(path)], vocab, str(tmp_path / "bad"), AnnDataSource(vocab), OPTIONS)
    assert not (tmp_path / "bad" / "summary.json").exists()
    source = AnnDataSource(vocab, layer="counts", obs_columns={"drug": "treatment"}, chunk_size=128)
    convert_anndata([str(path)], vocab, str(tmp_path / "ok"), source, OPTIONS)
    cells = read_all(tmp_path / "ok")
    _check(cells, _expected(sp.csr_matrix(counts), np.arange(3, 3 + len(ensembl)), "cells.h5ad"))
    assert cells["cells.h5ad:0"]["drug"] == "drugA" and cells["cells.h5ad:0"]["dose"] == "0.5"
    assert cells["cells.h5ad:1"]["drug"] == "DMSO_TF" and cells["cells.h5ad:1"]["dose"] == "0"
    labels = json.loads((tmp_path / "ok" / "labels.json").read_text())
    assert labels["drug"] == ["DMSO_TF", "drugA"] and labels["dose"] == ["0", "0.5"]


def test_round_counts_is_an_explicit_override(tmp_path):
    ensembl, symbols, _, counts = _mouse()
    x = sp.csr_matrix(counts[:200].astype(np.float32) * 1.0001)  # almost integers, as after float round trips
    path = _h5ad(tmp_path, x)
    vocab = GeneVocab.from_features(ensembl, symbols)
    source = AnnDataSource(vocab)
    with pytest.raises(NotRawCountsError, match="cells.h5ad"):
        list(source.batches(str(path)))
    rounded = AnnDataSource(vocab, round_counts=True)
    batches = list(rounded.batches(str(path)))
    assert sum(int(b.counts.sum()) for b in batches) == int(np.rint(x.data).sum())


def test_features_sharing_a_token_keep_the_first():
    vocab = GeneVocab([3, 4], ["ENSG1", "ENSG2"], ["A", "B"])
    mapping = map_features(vocab, ["ENSG1", "", "ENSG2", "ENSG9"], ["A", "A", "", "C"])
    assert mapping.tokens.tolist() == [3, -1, 4, -1]
    assert mapping.report() == {
        "features": 4,
        "matched_by_ensembl": 2,
        "matched_by_symbol": 0,
        "duplicate_token": 1,
        "unmatched": 1,
    }


def test_two_inputs_merge_into_one_dataset(tmp_path):
    ensembl, symbols, barcodes, counts = _mouse()
    _write_10x_h5(tmp_path / "a.h5", counts[:300], ensembl, symbols, barcodes[:300])
    _write_10x_h5(tmp_path / "b.h5", counts[300:500], ensembl, symbols, barcodes[300:500])
    vocab = GeneVocab.from_features(ensembl, symbols)
    paths = [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]
    convert_anndata(paths, vocab, str(tmp_path / "both"), AnnDataSource(vocab), OPTIONS)
    tokens = np.arange(3, 3 + len(ensembl))
    expected = {**_expected(counts[:300], tokens, "a.h5"), **_expected(counts[300:500], tokens, "b.h5")}
    both = read_all(tmp_path / "both")
    _check(both, expected)
