"""HF export of a latent_dit run: one folder with the VAE, the latent DiT, the latent scale and the training
library sizes, equal outputs to the training model, and loadable by AutoModel without ddsc."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from without_ddsc import run_without

from ddsc.cli import main as cli_main
from ddsc.config import load_config, save_config
from ddsc.data.binning_config import BinningConfig
from ddsc.data.collator import CellCollator
from ddsc.data.labels import LabelVocab
from ddsc.latent.config import LatentVAEConfig
from ddsc.latent.hf import DDSCLatentModel
from ddsc.latent.vae import LatentVAE
from ddsc.train.config import RunConfig
from ddsc.train.export import export_checkpoint
from ddsc.train.latent_models import LatentDiTComposerModel
from ddsc.train.run import resolve_model_config

sys.path.insert(0, str(Path(__file__).parent))
from train_data import write_mds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GENES = 200


def latent_run_config(mds: Path, vae_folder: Path) -> RunConfig:
    overrides = [
        f"data.streams.demo.remote={mds}",
        "data.max_length=16",
        "data.num_workers=0",
        f"model.gene_vocab_size={GENES}",
        "model.conditions=[{name: cell_line_id, dropout: 0.1}, {name: drug, dropout: 0.1}]",
        f"latent_dit.vae={vae_folder}",
        "latent_dit.d_model=32",
        "latent_dit.n_layers=2",
        "latent_dit.sampler_steps=4",
    ]
    run = load_config(RunConfig, ROOT / "yamls" / "latent_dit_demo_cpu.yaml", overrides)
    vae = LatentVAEConfig(d_model=32, n_heads=4, n_latents=4, d_latent=3, encoder_layers=1, decoder_layers=1)
    labels = LabelVocab.from_json(mds / "labels.json")
    return dataclasses.replace(run, latent_vae=vae, model=resolve_model_config(run.model, labels))


def collator_batch(run: RunConfig, seed: int = 0, cells: int = 8) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = LabelVocab.from_json(Path(run.data.streams["demo"].remote) / "labels.json")
    samples = []
    for i in range(cells):
        n = int(rng.integers(4, 30))
        genes = np.sort(rng.choice(np.arange(3, GENES), n, replace=False)).astype(np.int32)
        counts = (rng.negative_binomial(2, 0.2, n) + 1).astype(np.int32)
        line, drug = labels.labels["cell_line_id"][i % 3], labels.labels["drug"][i % 2]
        samples.append(
            {"genes": genes, "counts": counts, "cell_id": f"c{seed}-{i}", "cell_line_id": line, "drug": drug}
        )
    collate = CellCollator(run.data.max_length, BinningConfig(num_bins=5), labels, run.model.conditions)
    return collate(samples)


def make_latent_run(root: Path) -> tuple[RunConfig, LatentDiTComposerModel, Path]:
    """A hand-made latent_dit run folder: config.yaml and a Composer checkpoint of a model with random (non-zero)
    heads, whose latent scale and library histogram come from two training-mode batches."""
    torch.manual_seed(0)
    mds = write_mds(root / "mds", n_train=8, n_valid=4, genes=GENES)
    save = root / "latent-dit"
    save.mkdir()
    run = latent_run_config(mds, root / "vae")
    model = LatentDiTComposerModel(run.latent_dit, LatentVAE(run.latent_vae, GENES), run.model.conditions).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # zero-initialised heads would make every comparison trivial
        for seed in (0, 1):
            model(collator_batch(run, seed))
    model.eval()
    save_config(run, save / "config.yaml")
    torch.save({"state": {"model": model.state_dict()}}, save / "ep0-ba2-rank0.pt")
    (save / "latest-rank0.pt").symlink_to("ep0-ba2-rank0.pt")
    return run, model, save


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_export")
    run, model, save = make_latent_run(root)
    summary = export_checkpoint(save, root / "hf")
    return run, model, root / "hf", summary


def fixed_inputs(run: RunConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    batch = collator_batch(run, seed=3)
    return {
        "z": torch.randn(5, 4, 3, generator=g),
        "genes": torch.randint(3, GENES, (5, 11), generator=g),
        "log_library": torch.rand(5, generator=g) * 5 + 3,
        "noise": torch.randn(5, 4, 3, generator=g),
        "cond": batch["cond"][:5],
        **{k: batch[k] for k in ("gene_ids", "counts", "attention_mask")},
    }


def reference(model: LatentDiTComposerModel, x: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """What the training model computes: decode, encode, and the flow sample in the VAE's latent space."""
    with torch.no_grad():
        params = model.vae.decode(x["z"], x["genes"], x["log_library"])
        encoded = model.vae.encode({k: x[k] for k in ("gene_ids", "counts", "attention_mask")}).mean
        latents = model.flow.sample(model.model, x["noise"], x["cond"], 4, 2.0) * model.latent_std
    return {"log_mu": params.log_mu.numpy(), "mean": encoded.numpy(), "latents": latents.numpy()}


def test_export_round_trip_gives_the_training_models_outputs(exported):
    run, model, folder, summary = exported
    assert {"config.json", "model.safetensors", "vocab.json", "labels.json", "hf.py", "latent_vae.py"} <= {
        p.name for p in folder.iterdir()
    }
    assert summary.num_params == sum(p.numel() for p in model.model.parameters()) + sum(
        p.numel() for p in model.vae.parameters()
    )
    loaded = DDSCLatentModel.from_pretrained(folder).eval()
    assert isinstance(transformers.AutoModel.from_pretrained(folder), DDSCLatentModel)
    assert loaded.config.model_type == "ddsc_latent" and loaded.config.latent_std == float(model.latent_std)
    assert loaded.config.library["cells"] == 16 and sum(loaded.config.library["counts"]) == 16
    x = fixed_inputs(run)
    with torch.no_grad():
        got = {
            "log_mu": loaded.decode(x["z"], x["genes"], x["log_library"]).log_mu.numpy(),
            "mean": loaded.encode(x["gene_ids"], x["counts"], x["attention_mask"]).numpy(),
            "latents": loaded.sample_latents(x["noise"], x["cond"], 4, 2.0).numpy(),
        }
    for key, want in reference(model, x).items():
        np.testing.assert_array_equal(got[key], want, err_msg=key)
    assert np.abs(got["latents"]).max() > 0
    again = export_checkpoint(folder.parent / "latent-dit", folder)
    assert again.up_to_date
    other = folder.parent / "hf_cli"
    assert cli_main(["export", "--checkpoint", str(folder.parent / "latent-dit"), "--out", str(other)]) == 0
    assert (other / "config.json").read_text() == (folder / "config.json").read_text()


def test_export_of_a_vae_run_is_refused_with_the_way_out(exported, tmp_path):
    run, _, _, _ = exported
    vae_run = dataclasses.replace(run, family="latent_vae")
    save_config(vae_run, tmp_path / "config.yaml")
    torch.save({"state": {"model": {}}}, tmp_path / "ep0-ba1-rank0.pt")
    with pytest.raises(ValueError, match="export the latent_dit run"):
        export_checkpoint(tmp_path / "ep0-ba1-rank0.pt", tmp_path / "hf")


def test_remote_code_loads_without_ddsc(exported, tmp_path):
    """AutoModel(trust_remote_code=True) where ``import ddsc`` fails: the same decode, encode and samples."""
    run, model, folder, _ = exported
    x = fixed_inputs(run)
    np.savez(tmp_path / "x.npz", **{k: v.numpy() for k, v in x.items()})
    script = textwrap.dedent(f"""
        import numpy as np, torch, transformers
        model = transformers.AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        x = {{k: torch.from_numpy(v) for k, v in np.load({str(tmp_path / "x.npz")!r}).items()}}
        with torch.no_grad():
            out = {{
                "log_mu": model.decode(x["z"], x["genes"], x["log_library"]).log_mu.numpy(),
                "mean": model.encode(x["gene_ids"], x["counts"], x["attention_mask"]).numpy(),
                "latents": model.sample_latents(x["noise"], x["cond"], 4, 2.0).numpy(),
            }}
        np.savez({str(tmp_path / "out.npz")!r}, **out)
        assert not any(m == "ddsc" or m.startswith("ddsc.") for m in sys.modules)
        print(type(model).__module__)
    """)
    done = run_without(script, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("transformers_modules.")
    got = np.load(tmp_path / "out.npz")
    for key, want in reference(model, x).items():
        np.testing.assert_array_equal(got[key], want, err_msg=key)
