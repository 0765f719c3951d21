"""``ddsc evaluate`` of a latent-family model: count imputation that never sees the hidden counts, on the masked
family's masks and baselines; NB reconstruction; generated cells in the data's bins; seeded, repeatable reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_latent_export import make_latent_run

from ddsc.cli import main as cli_main
from ddsc.data.batch_layout import cell_layout, pad_cells
from ddsc.eval.cells import collate_cells, fresh_collator, length_batches
from ddsc.eval.evaluate import read_mds
from ddsc.eval.latent_cells import MAX_HIDDEN_SHARE, LatentCellModel, latent_imputation, reconstruction
from ddsc.eval.masks import cell_mask
from ddsc.inference import Predictor
from ddsc.latent.vae import log_library
from ddsc.train.export import export_checkpoint


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_eval")
    _, _, save = make_latent_run(root)
    export_checkpoint(save, root / "hf")
    predictor = Predictor.from_pretrained(root / "hf", progress=False)
    samples = read_mds(root / "mds" / "train", 100, 0) + read_mds(root / "mds" / "valid", 100, 0)
    cells = collate_cells(fresh_collator(predictor.collator, 0), samples)
    return root, predictor, cells


def _one_cell_reference(model, cells, i: int, rate: float) -> np.ndarray:
    """The imputation of cell ``i`` computed another way: the hidden genes *removed* from the encoder's input
    (not masked), their means decoded, the library divided by one minus their decoded share."""
    mask = cell_mask(cells.cell_ids[i], cells.genes[i], rate, 0)
    genes, counts = torch.from_numpy(cells.genes[i]), torch.from_numpy(cells.counts[i]).float()
    seen = cell_layout(*_padded(genes[~mask], counts[~mask]))
    z = model.encode(seen["gene_ids"], seen["counts"], seen["attention_mask"])
    observed = float(counts[~mask].sum())
    hidden = genes[mask][None]
    share = float(model.decode(z, hidden, torch.tensor([np.log(observed)])).log_mu.double().exp().sum()) / observed
    full = torch.tensor([np.log(observed) - np.log1p(-min(share, MAX_HIDDEN_SHARE))], dtype=torch.float32)
    return model.decode(z, hidden, full).log_mu.double().exp()[0].numpy()


def _padded(genes, counts):
    gene_ids, values, valid = pad_cells([genes.numpy()], [counts.numpy()])
    return gene_ids, valid, values


@torch.no_grad()
def test_imputation_uses_the_other_genes_only_and_matches_a_reference(latent):
    _, predictor, cells = latent
    cells = cells.subset(range(len(cells)))  # its own count list: the test rewrites counts
    model = predictor.model
    batches = length_batches(cells, range(len(cells)), 5)
    stats = latent_imputation(model, cells, batches, (0.3,), seed=0)["0.3"]
    owner, values = np.concatenate(stats.cells), np.concatenate(stats.imputed)
    for i in (0, 3, len(cells) - 1):
        np.testing.assert_allclose(values[owner == i], _one_cell_reference(model, cells, i, 0.3), rtol=1e-4)
    # changing the hidden counts changes the truth scored against, never the imputation
    for i in range(len(cells)):
        mask = cell_mask(cells.cell_ids[i], cells.genes[i], 0.3, 0)
        cells.counts[i] = np.where(mask, cells.counts[i] * 7 + 3, cells.counts[i])
    again = latent_imputation(model, cells, batches, (0.3,), seed=0)["0.3"]
    np.testing.assert_array_equal(np.concatenate(again.imputed), values)
    assert not np.array_equal(np.concatenate(again.true), np.concatenate(stats.true))


@torch.no_grad()
def test_reconstruction_is_the_nb_likelihood_of_the_cells(latent):
    _, predictor, cells = latent
    model = predictor.model
    got = reconstruction(model, cells, batch_size=3)
    i = 2  # one cell by hand, prior mean: decode z = 0 with the cell's own library
    genes, counts = torch.from_numpy(cells.genes[i])[None], torch.from_numpy(cells.counts[i]).float()[None]
    z = torch.zeros(1, *model.latent_shape)
    one = -model.decode(z, genes, log_library(counts, torch.ones_like(counts, dtype=torch.bool))).log_prob(counts)
    n = sum(len(g) for g in cells.genes)
    assert got["num_genes"] == n
    rest = reconstruction(model, cells.subset([j for j in range(len(cells)) if j != i]), batch_size=4)
    total = got["nb_nll_per_gene"]["prior_mean"] * n
    assert total == pytest.approx(rest["nb_nll_per_gene"]["prior_mean"] * (n - len(cells.genes[i])) + float(one.sum()))
    assert got["latent_gain_nats"] == pytest.approx(
        got["nb_nll_per_gene"]["prior_mean"] - got["nb_nll_per_gene"]["posterior_mean"]
    )


def test_generated_cells_are_binned_like_real_ones_and_seeded(latent):
    _, predictor, cells = latent
    cell_model = LatentCellModel(predictor.model, predictor.collator, steps=3, seed=5, batch_size=4)
    idx = [0, 2, 4, 5, 7]
    drawn = cell_model.generate(cells, idx)
    again = cell_model.generate(cells, idx)
    other = LatentCellModel(predictor.model, predictor.collator, steps=3, seed=6, batch_size=4).generate(cells, idx)
    k = predictor.collator.binning.num_bins
    for j, i in enumerate(idx):
        np.testing.assert_array_equal(drawn.genes[j], cells.genes[i])
        assert drawn.bins[j].min() >= 0 and drawn.bins[j].max() < k
        np.testing.assert_array_equal(drawn.bins[j], again.bins[j])
    assert any(not np.array_equal(a, b) for a, b in zip(drawn.bins, other.bins, strict=True))
    # expected values: common random numbers, so the same labels give exactly the same means
    panels = cells.subset(idx)
    first, second = cell_model.expected(panels, panels.cond), cell_model.expected(panels, panels.cond)
    for a, b, genes in zip(first, second, panels.genes, strict=True):
        assert a.shape == genes.shape and np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)


def test_ddsc_evaluate_reports_a_latent_model_on_the_shared_protocol(latent, tmp_path):
    root, _, _ = latent
    common = ["--model", str(root / "hf"), "--data", str(root / "mds"), "--knn-k", "3", "--steps", "3"]
    common += ["--generate-cells", "2", "--mask-rates", "0.3,0.7"]
    assert cli_main(["evaluate", *common, "--out", str(tmp_path / "a")]) == 0
    assert cli_main(["evaluate", *common, "--out", str(tmp_path / "b"), "--batch-size", "3"]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["setup"]["family"] == "latent" and "masked" not in a and "nelbo" not in a
    names = {"model", "marginal", "knn", "cell_histogram", "gene_cell_product", "gene_mean", "knn_mean"}
    for rate in ("0.3", "0.7"):
        scores = a["imputation_counts"][rate]["scores"]
        assert set(scores) == names
        assert len({s["num_masked"] for s in scores.values()}) == 1  # one set of masked positions for all
        for name in names:  # batching changes nothing
            assert scores[name]["pearson_log1p"] == pytest.approx(
                b["imputation_counts"][rate]["scores"][name]["pearson_log1p"], abs=1e-6
            )
    assert a["reconstruction"]["num_genes"] > 0
    assert set(a["generation"]) >= {"generated", "reference"} and a["generation"]["steps"] == 3
    assert set(a["embedding"]["cell_line_id"]) >= {"ddsc_latent", "pca50_log1p"}
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "VAE reconstruction" in summary and "DDSC latent" in summary
