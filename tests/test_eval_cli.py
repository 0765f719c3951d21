"""``ddsc evaluate`` end to end: a tiny model trained by the real trainer, written by ``ddsc export``, evaluated
on an MDS folder and on an .h5ad; metrics.json is checked against the CE recomputed here from the exported
model and the raw cells (bins by hand-independent collation, the marginal baseline by hand, kNN by
``ddsc.eval.baselines``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from streaming import StreamingDataset

from ddsc import cli
from ddsc.config import from_dict
from ddsc.data.binning_config import BinningConfig
from ddsc.data.collator import CellCollator
from ddsc.data.labels import LabelVocab
from ddsc.data.splits import unit_hash
from ddsc.data.vocab import GeneVocab
from ddsc.eval.baselines import KNNBaseline
from ddsc.eval.embedding import label_scores
from ddsc.eval.masks import cell_mask
from ddsc.model.hf import DDSCModel
from ddsc.train.config import RunConfig
from ddsc.train.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from train_data import write_mds  # noqa: E402

N_GENES = 200
K = 8
CONDITIONS = ["cell_line_id", "drug"]
ENSEMBL = [f"ENSG{i:011d}" for i in range(N_GENES - 3)]  # token id = 3 + index


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(MDS folder, exported model folder): 6 real training batches, then ``ddsc export``."""
    root = tmp_path_factory.mktemp("eval_cli")
    data = write_mds(root / "mds", n_train=96, n_valid=32, genes=N_GENES, max_genes=30)
    GeneVocab.from_features(ENSEMBL, [f"G{i}" for i in range(N_GENES - 3)]).to_json(data / "vocab.json")
    config = from_dict(
        RunConfig,
        {
            "data": {
                "streams": {"a": {"local": str(data)}},
                "max_length": 32,  # above the longest cell (30 genes): no random gene subset anywhere
                "num_workers": 0,
                "binning": {"method": "quantile", "num_bins": K},
            },
            "model": {
                "d_model": 32,
                "n_layers": 2,
                "n_heads": 4,
                "num_bins": K,
                "gene_vocab_size": N_GENES,
                "conditions": [{"name": c} for c in CONDITIONS],
            },
            "optimizer": {"lr": 0.01},
            "scheduler": {"t_warmup": "0ba", "name": "constant_with_warmup"},
            "trainer": {
                "max_duration": "6ba",
                "global_train_batch_size": 16,
                "device_train_microbatch_size": 16,
                "save_folder": str(root / "run"),
                "save_interval": "6ba",
                "eval_interval": "6ba",
                "progress_bar": False,
                "log_to_console": False,
            },
        },
    )
    train(config)
    assert cli.main(["export", "--checkpoint", str(root / "run" / "latest-rank0.pt"), "--out", str(root / "hf")]) == 0
    return data, root / "hf"


def mds_samples(split: Path) -> list[dict]:
    dataset = StreamingDataset(local=str(split), shuffle=False, batch_size=1)
    return [dataset[i] for i in range(len(dataset))]


def direct_ce(model_dir: Path, train: list[dict], evaluated: list[dict], rate: float, seed: int = 0) -> dict:
    """Masked CE of the exported model, the per-gene marginal (by hand) and kNN on the evaluation cells' fixed
    masks at ``rate``: one collated batch, one forward pass."""
    model = DDSCModel.from_pretrained(model_dir).eval()
    labels = LabelVocab.from_json(model_dir / "labels.json")
    collator = CellCollator(32, BinningConfig(method="quantile", num_bins=K), labels, CONDITIONS)

    def cells(samples):
        batch = collator(samples)
        return batch, [
            (batch["gene_ids"][i, r].numpy(), batch["expr"][i, r].numpy()) for i, r in enumerate(batch["real"])
        ]

    _, train_cells = cells(train)
    batch, eval_cells = cells(evaluated)
    mask = torch.zeros_like(batch["real"])
    for i, (sample, (genes, _)) in enumerate(zip(evaluated, eval_cells, strict=True)):
        mask[i, 1 : 1 + len(genes)] = torch.from_numpy(cell_mask(str(sample["cell_id"]), genes, rate, seed))
    with torch.no_grad():
        noisy = batch["expr"].masked_fill(mask, K)
        logp = model(batch["gene_ids"], noisy, batch["attention_mask"], batch["cond"]).double().log_softmax(-1)
    targets = batch["expr"][mask]
    model_ce = -logp[mask].gather(1, targets[:, None]).mean().item()

    hist = np.bincount(np.concatenate([b for _, b in train_cells]), minlength=K) + 1.0
    global_p = hist / hist.sum()
    per_gene: dict[int, np.ndarray] = {}
    for genes, bins in train_cells:
        for g, b in zip(genes.tolist(), bins.tolist(), strict=True):
            per_gene.setdefault(g, np.zeros(K))[b] += 1
    marginal = []
    for row, (genes, bins) in enumerate(eval_cells):
        hidden = mask[row, 1 : 1 + len(genes)].numpy()
        for g, b in zip(genes[hidden].tolist(), bins[hidden].tolist(), strict=True):
            counts = per_gene.get(g, np.zeros(K))
            marginal.append(-np.log((counts[b] + global_p[b]) / (counts.sum() + 1.0)))
    knn = KNNBaseline.fit(train_cells, K, k=3, alpha=1.0)
    queries = [(g, b, mask[row, 1 : 1 + len(g)].numpy()) for row, (g, b) in enumerate(eval_cells)]
    probs = knn.predict(queries)
    knn_ce = -np.log(probs[np.arange(len(probs)), targets.numpy()]).mean()
    return {"model": model_ce, "marginal": float(np.mean(marginal)), "knn": float(knn_ce), "masked": len(targets)}


def check(metrics: dict, expected: dict, rate: str) -> None:
    got = metrics["masked"][rate]
    assert got["model"]["num_masked"] == got["marginal"]["num_masked"] == expected["masked"] > 0
    for name in ("model", "marginal", "knn"):
        assert got[name]["masked_ce"] == pytest.approx(expected[name], rel=1e-5), name
    assert np.isfinite(got["model"]["masked_ce"]) and got["model"]["masked_ce"] < np.log(K)  # it learnt something
    assert metrics["margins"][rate]["vs_knn"] == pytest.approx(expected["knn"] - expected["model"], rel=1e-4)


def evaluate_cli(model: Path, data: Path, out: Path, *extra: str) -> dict:
    argv = ["evaluate", "--model", str(model), "--data", str(data), "--out", str(out), "--mask-rates", "0.3,0.7"]
    assert cli.main([*argv, "--knn-k", "3", "--batch-size", "16", *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_evaluate_mds_folder(exported, tmp_path):
    data, model = exported
    metrics = evaluate_cli(
        model,
        data,
        tmp_path,
        *("--split", "valid", "--nelbo-points", "2", "--generate-cells", "8", "--steps", "4"),
        *("--min-group-cells", "2"),  # 32 cells in 3 cell lines x 2 drugs: about 2.7 per group and half
    )
    train_samples, valid_samples = mds_samples(data / "train"), mds_samples(data / "valid")
    assert metrics["setup"]["eval_cells"] == 32 and metrics["setup"]["baseline_train_cells"] == 96
    check(metrics, direct_ce(model, train_samples, valid_samples, 0.7), "0.7")
    assert 0 < metrics["nelbo"]["nelbo"] < 10 and len(metrics["nelbo"]["nelbo_per_t"]) == 2
    assert metrics["generation"]["num_generated"] == 8
    pert = metrics["perturbation"]
    assert pert["num_groups"] >= 1  # drugX vs DMSO_TF in the synthetic cells
    assert set(pert["predictors"]) == {"model", "control_mean", "perturbation_mean", "real_half"}
    assert all(key.endswith("|drugX") for key in pert["predictors"]["model"]["groups"])  # no dose in these cells
    # the cells carry cell lines and drugs: both label the embeddings (ddsc embed's three and the PCA baseline)
    assert set(metrics["embedding"]) == {"cell_line_id", "drug"}
    assert set(metrics["embedding"]["drug"]) == {
        "num_labels",
        "majority_fraction",
        "ddsc_labels",
        "ddsc_cls",
        "ddsc_mean",
        "pca50_log1p",
    }
    assert "ground_truth" not in metrics  # no demo ground truth beside this dataset
    page = (tmp_path / "summary.md").read_text()
    assert f"| 0.7 | DDSC | {metrics['masked']['0.7']['model']['masked_ce']:.4f} [" in page
    assert "## Perturbation" in page and "## Embeddings" in page


def test_evaluate_h5ad(exported, tmp_path):
    data, model = exported
    samples = mds_samples(data / "train")[:40] + mds_samples(data / "valid")
    x = np.zeros((len(samples), N_GENES - 3 + 2), dtype=np.float32)  # + 2 genes the model does not know
    for i, s in enumerate(samples):
        x[i, s["genes"] - 3] = s["counts"]
    x[0, :] = 0  # a cell without a matched non-zero gene: dropped and counted
    x[0, -1] = 5
    obs = pd.DataFrame({c: [s[c] for s in samples] for c in CONDITIONS}, index=[s["cell_id"] for s in samples])
    var = pd.DataFrame(index=[*ENSEMBL, "ENSGUNKNOWN1", "ENSGUNKNOWN2"])
    path = tmp_path / "cells.h5ad"
    anndata.AnnData(X=x, obs=obs, var=var).write_h5ad(path)

    metrics = evaluate_cli(
        model, path, tmp_path / "report", "--nelbo-points", "0", "--generate-cells", "0", "--embed-labels", "drug"
    )
    kept = samples[1:]
    fit = [s for s in kept if unit_hash(0, s["cell_id"]) < 0.5]
    rest = [s for s in kept if unit_hash(0, s["cell_id"]) >= 0.5]
    assert metrics["setup"]["eval_cells"] == len(rest) and metrics["setup"]["baseline_train_cells"] == len(fit)
    assert "1 dropped" in metrics["setup"]["data"] and "197 of 199 genes matched" in metrics["setup"]["data"]
    check(metrics, direct_ce(model, fit, rest, 0.3), "0.3")
    # the embeddings scored are those of `ddsc embed --null-conditions` on the same file, evaluation cells only
    embed = ["embed", "--model", str(model), "--input", str(path), "--output", str(tmp_path / "e.h5ad")]
    assert cli.main([*embed, "--null-conditions"]) == 0
    embedded = anndata.read_h5ad(tmp_path / "e.h5ad")
    rows = [embedded.obs_names.get_loc(s["cell_id"]) for s in rest]
    labels = [s["drug"] for s in rest]
    for key, name in (("X_ddsc_labels", "ddsc_labels"), ("X_ddsc_cls", "ddsc_cls"), ("X_ddsc_mean", "ddsc_mean")):
        expected = label_scores(embedded.obsm[key][rows], labels, k=3)
        assert metrics["embedding"]["drug"][name]["knn_accuracy"] == pytest.approx(expected["knn_accuracy"])
        assert metrics["embedding"]["drug"][name]["ari"] == pytest.approx(expected["ari"])
    assert list(metrics["embedding"]) == ["drug"]  # the named column only


def test_evaluate_names_a_missing_label_column(exported, tmp_path, capsys):
    data, model = exported
    argv = ["evaluate", "--model", str(model), "--data", str(data), "--out", str(tmp_path), "--embed-labels", "tissue"]
    assert cli.main([*argv, "--nelbo-points", "0", "--generate-cells", "0", "--mask-rates", "0.5"]) == 2
    assert "no column 'tissue'" in capsys.readouterr().err


def test_reruns_of_finished_steps_do_nothing_until_an_input_changes(exported, tmp_path, capsys):
    """``make demo`` re-runs every step: export and evaluate detect their own completed output (done markers)."""
    data, model = exported
    checkpoint = model.parent / "run" / "latest-rank0.pt"
    mtimes = lambda folder: {p: p.stat().st_mtime_ns for p in folder.rglob("*")}  # noqa: E731
    before = mtimes(model)
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(model)]) == 0
    assert capsys.readouterr().out == f"{model} is up to date with its composer checkpoint; nothing to do\n"
    assert mtimes(model) == before

    args = ["--split", "valid", "--nelbo-points", "0", "--generate-cells", "0"]
    evaluate_cli(model, data, tmp_path / "report", *args)
    report = mtimes(tmp_path / "report")
    capsys.readouterr()
    evaluate_cli(model, data, tmp_path / "report", *args)
    assert capsys.readouterr().out.endswith("is up to date with its model, data and settings; nothing to do\n")
    assert mtimes(tmp_path / "report") == report
    evaluate_cli(model, data, tmp_path / "report", *args, "--seed", "1")  # another setting: evaluated again
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["setup"]["seed"] == 1
    capsys.readouterr()

    os.utime(checkpoint.resolve())  # the checkpoint changed (say, training went on): exported again
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(model)]) == 0
    assert capsys.readouterr().out.startswith("exported composer checkpoint")
