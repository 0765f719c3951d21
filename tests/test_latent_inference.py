"""The latent family through the inference interface: Predictor dispatch, generate (panel, conditions, seeds,
library sizes), embed (deterministic, var-order invariant, chunked long cells) and the ddsc commands."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from test_latent_export import make_latent_run

from ddsc.cli import main as cli_main
from ddsc.inference import LatentPredictor, Predictor
from ddsc.inference.rows import gene_chunks
from ddsc.train.export import export_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_inference")
    _, _, save = make_latent_run(root)
    export_checkpoint(save, root / "hf")
    return root / "hf"


@pytest.fixture(scope="module")
def predictor(folder):
    return Predictor.from_pretrained(folder, progress=False, batch_size=4)


def raw_cells(n: int = 6, seed: int = 0) -> anndata.AnnData:
    """Raw counts over 40 vocabulary genes (Ensembl ids as var names); cell 0 has all 40 (> max_genes = 16)."""
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.4, (n, 40)).astype(np.float32) * (rng.random((n, 40)) < 0.5)
    x[0] = 1 + rng.poisson(3, 40)
    var = pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(3, 43)])
    return anndata.AnnData(X=sp.csr_matrix(x), obs=pd.DataFrame(index=[f"cell{i}" for i in range(n)]), var=var)


def test_predictor_dispatches_on_the_model_type(predictor):
    assert isinstance(predictor, LatentPredictor) and predictor.family == "latent"
    with pytest.raises(ValueError, match="latent-family model"):
        predictor.impute(raw_cells(), mask_fraction=0.3)


def test_generate_honours_the_panel_conditions_and_seed(predictor):
    panel = ["G5", "ENSG00000000009", "G150", "G7", "G199"]
    lines = ["CVCL_A", "CVCL_B", "", "CVCL_C", "CVCL_A", "CVCL_B", "CVCL_C"]
    out = predictor.generate(panel, {"cell_line_id": lines, "drug": ["drugX"]}, n_cells=7, steps=3, seed=4)
    assert list(out.var_names) == panel and out.var["token_id"].tolist() == [5, 9, 150, 7, 199]
    assert out.obs["cell_line_id"].tolist() == lines and set(out.obs["drug"]) == {"drugX"}
    x = out.X.toarray()
    assert x.shape == (7, 5) and (x >= 0).all() and np.array_equal(x, np.round(x))
    assert out.layers["ddsc_mean"].shape == (7, 5) and (out.layers["ddsc_mean"] > 0).all()
    library = predictor.model.config.library
    seen = np.flatnonzero(library["counts"])  # libraries come from the training histogram's occupied bins
    width = (library["high"] - library["low"]) / len(library["counts"])
    log_lib = np.log(out.obs["library_size"].to_numpy())
    assert (log_lib >= library["low"] + seen.min() * width - 1e-4).all()
    assert (log_lib <= library["low"] + (seen.max() + 1) * width + 1e-4).all()
    assert out.uns["ddsc_generate"]["steps"] == 3 and out.uns["ddsc_generate"]["nfe"] == 3 * 2  # 2 batches of 4

    again = predictor.generate(panel, {"cell_line_id": lines, "drug": ["drugX"]}, n_cells=7, steps=3, seed=4)
    np.testing.assert_array_equal(again.layers["ddsc_mean"], out.layers["ddsc_mean"])
    np.testing.assert_array_equal(again.X.toarray(), x)
    other = predictor.generate(panel, {"cell_line_id": ["CVCL_C"] * 7, "drug": ["drugX"]}, n_cells=7, steps=3, seed=4)
    differs = np.abs(other.layers["ddsc_mean"] - out.layers["ddsc_mean"]).max(axis=1) > 0
    assert differs.tolist() == [line != "CVCL_C" for line in lines]  # the same noise: only the condition differs
    whole = predictor.generate(predictor.vocab.ensembl_ids[:150], n_cells=2, steps=2)  # any panel size (> max_genes)
    assert whole.shape == (2, 150)
    with pytest.raises(ValueError, match="unknown label 'CVCL_Z'"):
        predictor.generate(panel, {"cell_line_id": ["CVCL_Z"]}, n_cells=1)
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        predictor.generate(["G5", "NOPE"], n_cells=1)


def test_generated_counts_follow_the_decoded_means(predictor):
    out = predictor.generate(["G5", "G40", "G90"], n_cells=400, steps=2, seed=1)
    ratio = out.X.toarray().mean(axis=0) / out.layers["ddsc_mean"].mean(axis=0)
    assert np.all(np.abs(ratio - 1) < 0.35), ratio


def test_embed_is_deterministic_var_order_invariant_and_chunks_long_cells(predictor):
    adata = raw_cells()
    out = predictor.embed(adata)
    emb = out.obsm["X_ddsc_latent"]
    assert emb.shape == (6, 4 * 3) and np.isfinite(emb).all()
    assert out.uns["ddsc_embed"]["matched_genes"] == 40 and out.uns["ddsc_embed"]["family"] == "latent"
    np.testing.assert_array_equal(predictor.embed(adata).obsm["X_ddsc_latent"], emb)
    order = np.random.default_rng(1).permutation(adata.n_vars)
    np.testing.assert_allclose(predictor.embed(adata[:, order].copy()).obsm["X_ddsc_latent"], emb, atol=1e-5)
    first = adata[:1].copy()  # 40 genes, more than max_genes = 16: the mean over three chunks
    x = first.X.toarray()[0]
    tokens = np.arange(3, 43)
    parts = gene_chunks(tokens, 16, 0)
    assert len(parts) == 3
    with torch.no_grad():
        means = []
        for part in parts:
            gene_ids = torch.tensor([[1, *tokens[part]]])
            counts = torch.tensor([[0.0, *x[part]]])
            means.append(predictor.model.encode(gene_ids, counts, gene_ids > 0).reshape(-1))
    np.testing.assert_allclose(emb[0], torch.stack(means).mean(0).numpy(), atol=1e-5)
    assert np.abs(emb[0] - emb[1]).max() > 1e-3  # different cells, different embeddings


def test_commands_generate_and_embed_work_and_refuse_masked_options(folder, tmp_path, capsys):
    out = tmp_path / "gen.h5ad"
    args = ["generate", "--model", str(folder), "--output", str(out), "--genes", "G5,G6,G7", "--n-cells", "3"]
    assert cli_main([*args, "--steps", "2", "--condition", "drug=drugX"]) == 0
    generated = anndata.read_h5ad(out)
    assert generated.shape == (3, 3) and set(generated.obs["drug"]) == {"drugX"}
    assert "counts" in capsys.readouterr().out
    assert cli_main([*args, "--method", "ancestral"]) == 2
    assert "--method: masked-family sampler options" in capsys.readouterr().err
    raw_cells().write_h5ad(tmp_path / "cells.h5ad")
    embed = [
        "embed",
        "--model",
        str(folder),
        "--input",
        str(tmp_path / "cells.h5ad"),
        "--output",
        str(tmp_path / "e.h5ad"),
    ]
    assert cli_main(embed) == 0
    assert anndata.read_h5ad(tmp_path / "e.h5ad").obsm["X_ddsc_latent"].shape == (6, 12)
    impute = [
        "impute",
        "--model",
        str(folder),
        "--input",
        str(tmp_path / "cells.h5ad"),
        "--output",
        str(tmp_path / "i.h5ad"),
    ]
    assert cli_main([*impute, "--mask-fraction", "0.3"]) == 2
    assert "latent-family model" in capsys.readouterr().err
