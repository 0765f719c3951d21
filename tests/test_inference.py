"""Inference on AnnData (impute / generate / embed) and its CLI, with random and hand-wired models."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from ddsc.cli import main
from ddsc.data.anndata_source import AnnDataSource
from ddsc.data.binning import bin_counts, bin_values, quantile_bins_reference
from ddsc.data.binning_config import BinningConfig
from ddsc.data.collator import CellCollator
from ddsc.data.labels import LabelVocab
from ddsc.data.raw_counts import NotRawCountsError
from ddsc.data.vocab import GeneVocab
from ddsc.inference import Predictor
from ddsc.model.export import write_hf_folder
from ddsc.model.hf import DDSCConfig, DDSCModel

K = 8  # bins
N_VOCAB = 60  # gene token ids 3..59
LINES = ["L0", "L1", "L2"]


def make_model(seed: int = 0, max_genes: int = 16) -> DDSCModel:
    torch.manual_seed(seed)
    config = DDSCConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        num_bins=K,
        gene_vocab_size=N_VOCAB,
        max_genes=max_genes,
        conditions=[{"name": "cell_line_id", "num_labels": 3}],
        binning={"num_bins": K},
    )
    model = DDSCModel(config)
    for module in model.modules():  # leave DiT's zero init: make every block and the head do something
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.3)
    return model


def save(model: DDSCModel, folder) -> str:
    vocab = GeneVocab.from_features(
        [f"ENSG{i:011d}" for i in range(N_VOCAB - 3)], [f"G{i}" for i in range(N_VOCAB - 3)]
    )
    write_hf_folder(model, folder, vocab, LabelVocab({"cell_line_id": LINES}))
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save(make_model(), tmp_path_factory.mktemp("model") / "hf")


def make_adata(n_cells: int = 10, seed: int = 0) -> anndata.AnnData:
    """40 vocabulary genes (by Ensembl id) + 2 genes the vocabulary lacks; some cells longer than max_genes."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.uniform(0.2, 4.0, size=(n_cells, 42))).astype(np.float32)
    x[x > 0] += rng.integers(0, 3, size=int((x > 0).sum()))
    names = [f"ENSG{i:011d}" for i in range(40)] + ["ENSMUSG00000000001", "ENSMUSG00000000002"]
    var = pd.DataFrame({"gene_symbols": [f"G{i}" for i in range(40)] + ["Xkr4", "Rp1"]}, index=names)
    obs = pd.DataFrame(
        {"cell_line_id": [LINES[i % 3] for i in range(n_cells)]}, index=[f"c{i}" for i in range(n_cells)]
    )
    return anndata.AnnData(X=sp.csr_matrix(x), obs=obs, var=var)


@pytest.mark.parametrize("method", ["argmax", "first_hitting"])
def test_impute_never_changes_observed_entries(model_dir, method):
    predictor = Predictor.from_pretrained(model_dir, progress=False, batch_size=4)
    adata = make_adata()
    x = adata.X.toarray()
    assert (np.count_nonzero(x[:, :40], axis=1) > 16).any()  # some cells are split into chunks
    out = predictor.impute(adata, mask_fraction=0.3, method=method, steps=4, seed=3)
    np.testing.assert_array_equal(out.X.toarray(), x)
    hidden = out.layers["ddsc_mask"].toarray()
    bins = out.layers["ddsc_bins"]
    imputed = out.layers["ddsc_imputed"].toarray()
    assert hidden[:, :40].sum() == hidden.sum() and (x[hidden] > 0).all()  # matched non-zero entries only
    assert 0.15 < hidden.sum() / np.count_nonzero(x[:, :40]) < 0.45
    for i in range(adata.n_obs):
        observed = (x[i] > 0) & ~hidden[i]
        observed[40:] = False
        reference = quantile_bins_reference(torch.from_numpy(x[i, observed]), BinningConfig(num_bins=K))
        np.testing.assert_array_equal(bins[i, observed], reference.numpy())  # binned from observed entries only
        np.testing.assert_array_equal(imputed[i, observed], x[i, observed])
    assert ((bins[hidden] >= 0) & (bins[hidden] < K)).all()
    assert (bins[:, 40:] == -1).all() and (bins[x == 0] == -1).all()  # unmatched genes / zeros not asked for
    assert (imputed[hidden] > 0).all()
    assert out.uns["ddsc_impute"]["matched_genes"] == 40 and out.uns["ddsc_impute"]["hidden_entries"] == hidden.sum()


@pytest.mark.parametrize("method", ["argmax", "ancestral"])
def test_impute_layers_give_one_answer(model_dir, method):
    """At hidden entries ``ddsc_imputed`` is the representative count of the bin in ``ddsc_bins`` (one answer),
    computed from the cell's observed counts alone."""
    predictor = Predictor.from_pretrained(model_dir, progress=False, batch_size=4)
    adata = make_adata(n_cells=8, seed=5)
    out = predictor.impute(adata, mask_fraction=0.4, method=method, steps=4, seed=1)
    x, hidden = adata.X.toarray()[:, :40], out.layers["ddsc_mask"].toarray()[:, :40]
    bins, imputed = out.layers["ddsc_bins"][:, :40], out.layers["ddsc_imputed"].toarray()[:, :40]
    assert hidden.sum() > 20 and out.uns["ddsc_impute"]["answer"] == (
        "argmax bin" if method == "argmax" else "sampled bin"
    )
    for i in range(adata.n_obs):
        counts = torch.from_numpy(x[i : i + 1])
        observed = (counts > 0) & ~torch.from_numpy(hidden[i : i + 1])
        values = bin_values(counts, observed, predictor.binning, (counts * observed).sum(dim=1, dtype=torch.float64))
        np.testing.assert_allclose(imputed[i, hidden[i]], values[0, bins[i, hidden[i]]].numpy(), rtol=1e-6)


def test_impute_reads_conditions_from_obs(tmp_path):
    """The wired model predicts its cell line's bin: impute uses ``obs`` conditions unless told otherwise, and an
    unknown label is the null label, counted."""
    predictor = Predictor.from_pretrained(save(wired_model(panel_bins=False), tmp_path / "m"), progress=False)
    adata = make_adata(n_cells=6)
    adata.obs["cell_line_id"] = ["L0", "L1", "L2", "L0", "L9", ""]
    expected = np.array([1, 3, 5, 1, 0, 0])  # L0 -> 1, L1 -> 3, L2 -> 5, unknown / null -> 0
    for conditions, want in ((None, expected), ({}, np.zeros(6)), ({"cell_line_id": ["L2"]}, np.full(6, 5))):
        out = predictor.impute(adata, mask_fraction=0.5, seed=2, conditions=conditions)
        hidden = out.layers["ddsc_mask"].toarray()
        rows = np.nonzero(hidden)[0]
        np.testing.assert_array_equal(out.layers["ddsc_bins"][hidden], want[rows])
    path, folder = tmp_path / "in.h5ad", str(tmp_path / "m")
    adata.write_h5ad(path)
    for flags, want in (
        ([], expected),
        (["--null-conditions"], np.zeros(6)),
        (["--condition", "cell_line_id=L1"], np.full(6, 3)),
    ):
        args = ["impute", "--model", folder, "--input", str(path), "--output", str(tmp_path / "o.h5ad"), "--seed", "2"]
        assert main([*args, "--mask-fraction", "0.5", *flags]) == 0
        out = anndata.read_h5ad(tmp_path / "o.h5ad")
        hidden = out.layers["ddsc_mask"].toarray()
        np.testing.assert_array_equal(out.layers["ddsc_bins"][hidden], want[np.nonzero(hidden)[0]])
    out = predictor.impute(adata, mask_fraction=0.5, seed=2)
    assert out.uns["ddsc_impute"]["conditions"] == {
        "source": "obs",
        "columns": ["cell_line_id"],
        "unknown_labels": {"cell_line_id": 1},
    }


def test_impute_by_gene_list_and_mask_and_seed(model_dir):
    predictor = Predictor.from_pretrained(model_dir, progress=False)
    adata = make_adata()
    out = predictor.impute(adata, genes=["ENSG00000000002", "ENSG00000000007"], method="confidence", steps=3)
    hidden = out.layers["ddsc_mask"].toarray()
    assert hidden.sum(axis=0).tolist() == [10 if j in (2, 7) else 0 for j in range(42)]  # zero entries too
    assert (out.layers["ddsc_bins"][:, [2, 7]] >= 0).all()

    mask = np.zeros(adata.shape, dtype=bool)
    mask[[0, 3, 5], [1, 4, 41]] = True  # column 41 is not in the vocabulary: cannot be predicted
    out = predictor.impute(adata, mask=mask)
    assert sorted(zip(*np.nonzero(out.layers["ddsc_mask"].toarray()), strict=True)) == [(0, 1), (3, 4)]

    runs = [
        predictor.impute(adata, mask_fraction=0.5, method="ancestral", steps=8, seed=s).layers["ddsc_bins"]
        for s in (1, 1, 2)
    ]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_bin_values_invert_binning():
    """A representative count of bin b bins back to b (fixed edges) / lies within bin b's counts (quantile)."""
    counts = torch.tensor([[1.0, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 0]])
    real = counts > 0
    library = counts.sum(dim=1, dtype=torch.float64)
    for cfg in (
        BinningConfig(method="global_log1p", num_bins=K),
        BinningConfig(method="log_uniform", num_bins=K),
        BinningConfig(method="uniform", num_bins=K, max_count=200.0),
        BinningConfig(method="log_uniform", num_bins=K, zero_fraction=0.2),
    ):
        values = bin_values(counts, real, cfg, library)
        first = 1 if cfg.zero_fraction else 0
        assert values[0, :first].eq(0).all()
        back = bin_counts(
            values[:, first:].float(), torch.ones(1, K - first, dtype=torch.bool), cfg, library_size=library
        )
        assert back.tolist() == [list(range(first, K))], cfg.method
    cfg = BinningConfig(num_bins=4)
    values = bin_values(counts, real, cfg, library)[0]
    bins = quantile_bins_reference(counts[0, real[0]], cfg)
    for b in range(4):
        inside = counts[0, real[0]][bins == b]
        assert inside.min() <= values[b] <= inside.max(), (b, inside, values[b])
    assert torch.all(values[1:] >= values[:-1])


def test_embed_matches_collated_forward(model_dir):
    predictor = Predictor.from_pretrained(model_dir, progress=False, batch_size=3)
    predictor.max_length = 64  # no chunking: compare with the training collator's batch
    adata = make_adata(n_cells=5)
    out = predictor.embed(adata, conditions={})  # null conditions, as the collated batch below
    samples, matched = predictor.samples_from_anndata(adata)
    assert matched == 40
    batch = CellCollator(64, predictor.binning)([{k: s[k] for k in ("genes", "counts")} for s in samples])
    with torch.no_grad():
        h = predictor.model.hidden(batch["gene_ids"], batch["expr"], batch["attention_mask"])
    mean = (h * batch["real"][..., None]).sum(1) / batch["real"].sum(1, keepdim=True)
    np.testing.assert_allclose(out.obsm["X_ddsc_cls"], h[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.obsm["X_ddsc_mean"], mean.numpy(), rtol=1e-5, atol=1e-5)
    chunked = Predictor.from_pretrained(model_dir, progress=False).embed(adata)  # max_genes=16: chunks
    assert chunked.obsm["X_ddsc_cls"].shape == (5, 32) and np.isfinite(chunked.obsm["X_ddsc_mean"]).all()


def wired_model(panel_bins: bool) -> DDSCModel:
    """A DiT whose output bin is set by the gene (gene g -> bin g % K) or by the cell line (line l -> bin 2l+1).

    All blocks are identity (zero adaLN gates); the head reads the first K hidden dimensions.
    """
    model = make_model()
    dit = model.dit
    with torch.no_grad():
        for p in dit.parameters():
            p.zero_()
        dit.head.weight[:, :K] = torch.eye(K)
        if panel_bins:
            dit.gene_embedding.weight[torch.arange(N_VOCAB), torch.arange(N_VOCAB) % K] = 10.0
        else:
            for label in range(4):  # row 0: the null label -> bin 0
                dit.cond_embeddings[0].weight[label, 2 * label - 1 if label else 0] = 1.0
            dit.final_adaln[-1].weight[:32] = 20 * torch.eye(32)  # shift = 20 * silu(c)
    return model


def test_generate_honours_gene_panel(tmp_path):
    predictor = Predictor.from_pretrained(save(wired_model(panel_bins=True), tmp_path / "m"), progress=False)
    panel = ["G10", "ENSG00000000003", "G22", "G0", "G5"]  # symbols and Ensembl ids; tokens 13, 6, 25, 3, 8
    out = predictor.generate(panel, n_cells=6, steps=5, temperature=0.1, seed=1)
    assert list(out.var_names) == panel and out.var["token_id"].tolist() == [13, 6, 25, 3, 8]
    assert out.var["symbol"].tolist() == ["G10", "G3", "G22", "G0", "G5"]
    np.testing.assert_array_equal(out.X, np.tile([13 % K, 6 % K, 25 % K, 3 % K, 8 % K], (6, 1)))
    assert out.uns["ddsc_generate"]["nfe"] == 5


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_generate_honours_conditions(tmp_path, guidance_scale):
    predictor = Predictor.from_pretrained(save(wired_model(panel_bins=False), tmp_path / "m"), progress=False)
    conditions = {"cell_line_id": ["L0", "L2", "", "L1", "L2"]}
    out = predictor.generate(
        [f"G{i}" for i in range(12)],
        conditions,
        n_cells=5,
        method="ancestral",
        steps=10,
        temperature=0.1,
        guidance_scale=guidance_scale,
        seed=2,
        trajectory_gif=tmp_path / "t.gif",
    )
    expected_bins = [1, 5, 0, 3, 5]  # L0 -> 1, L1 -> 3, L2 -> 5, null -> 0
    np.testing.assert_array_equal(out.X, np.repeat(np.array(expected_bins)[:, None], 12, axis=1))
    assert out.obs["cell_line_id"].tolist() == conditions["cell_line_id"]
    assert (tmp_path / "t.gif").read_bytes()[:6] == b"GIF89a"


def test_clear_errors(model_dir, tmp_path):
    predictor = Predictor.from_pretrained(model_dir, progress=False)
    mouse = make_adata()[:, 40:].copy()  # only genes outside the vocabulary
    mouse.var_names = ["ENSMUSG00000000001", "ENSMUSG00000000002"]
    with pytest.raises(ValueError, match="matched 0 of 2"):
        predictor.embed(mouse)
    with pytest.raises(ValueError, match=r"2 of 4 genes are not in the model's vocabulary \(matched 2\)"):
        predictor.generate(["G1", "Xkr4", "G2", "Rp1"])
    with pytest.raises(ValueError, match="unknown label 'L9'"):
        predictor.generate(["G1"], {"cell_line_id": ["L9"]})
    with pytest.raises(ValueError, match="no condition 'drug'"):
        predictor.generate(["G1"], {"drug": ["x"]})
    with pytest.raises(ValueError, match="1 to 16"):
        predictor.generate([f"G{i}" for i in range(17)])
    with pytest.raises(ValueError, match="give mask_fraction, mask or genes"):
        predictor.impute(make_adata())
    bad = make_adata()
    bad.X = bad.X.toarray()
    bad.X[4, 2] = -1
    with pytest.raises(ValueError, match="X: cell 'c4', gene 'G2' has value -1: raw integer counts"):
        predictor.embed(bad)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    (incomplete / "labels.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing model.safetensors, vocab.json"):
        Predictor.from_pretrained(incomplete)


def test_cli_impute_generate_embed(model_dir, tmp_path, capsys):
    make_adata().write_h5ad(tmp_path / "in.h5ad")
    common = ["--model", model_dir, "--batch-size", "4"]
    assert (
        main(
            [
                "impute",
                "--input",
                str(tmp_path / "in.h5ad"),
                "--output",
                str(tmp_path / "imp.h5ad"),
                "--mask-fraction",
                "0.2",
                *common,
            ]
        )
        == 0
    )
    assert main(["embed", "--input", str(tmp_path / "in.h5ad"), "--output", str(tmp_path / "emb.h5ad"), *common]) == 0
    assert (
        main(
            [
                "generate",
                "--genes",
                "G1,G2,G3",
                "--n-cells",
                "3",
                "--condition",
                "cell_line_id=L1",
                "--output",
                str(tmp_path / "gen.h5ad"),
                "--steps",
                "3",
                *common,
            ]
        )
        == 0
    )
    imputed = anndata.read_h5ad(tmp_path / "imp.h5ad")
    assert imputed.layers["ddsc_mask"].sum() == imputed.uns["ddsc_impute"]["hidden_entries"] > 0
    assert anndata.read_h5ad(tmp_path / "emb.h5ad").obsm["X_ddsc_cls"].shape == (10, 32)
    generated = anndata.read_h5ad(tmp_path / "gen.h5ad")
    assert generated.shape == (3, 3) and generated.obs["cell_line_id"].tolist() == ["L1"] * 3
    assert "imputed" in capsys.readouterr().out
    assert main(["generate", "--genes", "Nope", "--output", str(tmp_path / "x.h5ad"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddsc generate: error: gene panel: 1 of 1 genes") and "\n" not in err
    assert not (tmp_path / "x.h5ad").exists()


def test_normalised_counts_are_refused_as_data_prep_refuses_them(model_dir, tmp_path, capsys):
    """impute / embed / evaluate apply data_prep's raw-count rule (the same function, the same message)."""
    adata = make_adata()
    adata.X = adata.X.log1p()
    path = tmp_path / "normalised.h5ad"
    adata.write_h5ad(path)
    vocab = GeneVocab.from_json(f"{model_dir}/vocab.json")
    with pytest.raises(NotRawCountsError) as data_prep:
        list(AnnDataSource(vocab).batches(str(path)))
    message = str(data_prep.value).removeprefix(f"{path}: ")
    assert message.startswith("cell 'c0', gene 'G0' has value 1.79176: raw integer counts are required")
    commands = {
        "impute": ["--input", str(path), "--output", str(tmp_path / "i.h5ad"), "--mask-fraction", "0.2"],
        "embed": ["--input", str(path), "--output", str(tmp_path / "e.h5ad")],
        "evaluate": ["--data", str(path), "--out", str(tmp_path / "report")],
    }
    for command, args in commands.items():
        assert main([command, "--model", model_dir, *args]) == 2
        assert capsys.readouterr().err == f"ddsc {command}: error: X: {message}\n"
    assert not (tmp_path / "i.h5ad").exists() and not (tmp_path / "report").exists()
    common = ["--model", model_dir, *commands["impute"], "--round-counts"]
    assert main(["impute", *common]) == 0  # rounding is an explicit choice
    out = anndata.read_h5ad(tmp_path / "i.h5ad")
    observed = ~out.layers["ddsc_mask"].toarray()[:, :40]  # the 40 vocabulary genes (the model sees only those)
    expected = np.rint(adata.X.toarray()[:, :40])[observed]
    assert np.array_equal(out.layers["ddsc_imputed"].toarray()[:, :40][observed], expected)
