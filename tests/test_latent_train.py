"""The latent family in training: the Composer wrappers on collator batches, the run config's family switch,
reading the VAE run, both stages through the Composer engine, and the package's import layers."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from test_latent import CONDITIONS, DIT_CFG, VAE_CFG, VOCAB
from test_layers import import_graph

from ddsc.config import ConfigError, load_config, save_config
from ddsc.data.binning_config import BinningConfig
from ddsc.data.collator import CellCollator
from ddsc.data.labels import LabelVocab
from ddsc.latent.config import LatentDiTConfig
from ddsc.latent.vae import LatentVAE
from ddsc.train.builders import build_composer_model, parameter_groups
from ddsc.train.config import RunConfig
from ddsc.train.export import export_checkpoint
from ddsc.train.latent_models import LatentDiTComposerModel, LatentVAEComposerModel, read_vae_run
from ddsc.train.run import resolve_latent_vae, resolve_model_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """As in test_latent.py: tiny models, and intra-op threads' spin waits on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def collator_batch(cells: int = 6) -> dict[str, torch.Tensor]:
    """A batch from the real ``CellCollator`` (the layout every family consumes), with two label conditions."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(cells):
        n = int(rng.integers(4, 20))
        genes = rng.choice(np.arange(3, VOCAB), n, replace=False).astype(np.int32)
        counts = (rng.negative_binomial(2, 0.3, n) + 1).astype(np.int32)
        line, drug = ["A", "B", "C"][i % 3], ["x", "y"][i % 2]
        samples.append({"genes": genes, "counts": counts, "cell_id": f"c{i}", "cell_line_id": line, "drug": drug})
    labels = LabelVocab({"cell_line_id": ["A", "B", "C"], "drug": ["x", "y"]})
    collate = CellCollator(max_length=12, binning=BinningConfig(num_bins=5), labels=labels, conditions=CONDITIONS)
    return collate(samples)


def test_vae_composer_model_forward_loss_eval_and_metrics():
    torch.manual_seed(0)
    model = LatentVAEComposerModel(VAE_CFG, VOCAB)
    batch = collator_batch()
    calls = []  # FSDP2 gathers a child's weights in hooks on its __call__: the wrapper must call it, not a method
    model.model.register_forward_pre_hook(lambda module, args: calls.append(module))
    out = model(batch)
    assert calls == [model.model]
    loss = model.loss(out, batch)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and model.model.gene_embedding.weight.grad.abs().sum() > 0
    model.eval()
    model.reset_eval_noise()
    first = model.eval_forward(batch)
    model.reset_eval_noise()
    assert torch.equal(model.eval_forward(batch).loss, first.loss)  # the same noise in every evaluation
    metrics = model.get_metrics(is_train=False)
    for metric in metrics.values():
        model.update_metric(batch, first, metric)
    assert float(metrics["nb_nll"].compute()) == pytest.approx(float(first.nll_sum / batch["real"].sum()), rel=1e-6)
    assert float(metrics["kl"].compute()) == pytest.approx(float(first.kl_sum) / 6, rel=1e-6)


def test_dit_composer_model_encodes_with_a_frozen_vae_and_keeps_its_latent_scale():
    torch.manual_seed(0)
    vae = LatentVAE(VAE_CFG, VOCAB)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    model = LatentDiTComposerModel(DIT_CFG, vae, CONDITIONS).train()
    assert not model.vae.training and model.model.training
    batch = collator_batch()
    assert float(model.latent_std) == 0.0
    calls = []
    for child in (model.vae, model.model):
        child.register_forward_pre_hook(lambda module, args: calls.append(module))
    out = model(batch)
    assert calls == [model.vae, model.model]  # both through __call__ (FSDP2 units)
    std = float(model.latent_std)
    assert std > 0 and float(model.latents(batch).std(unbiased=False)) == pytest.approx(1.0, abs=0.15)
    model.loss(out, batch).backward()
    assert all(p.grad is None for p in model.vae.parameters())
    assert model.model.head.weight.grad.abs().sum() > 0
    model(collator_batch(3))
    assert float(model.latent_std) == std  # estimated once
    assert "latent_std" in model.state_dict()
    assert all(torch.equal(before[k], v) for k, v in model.vae.state_dict().items())
    groups = parameter_groups(model, 0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.model.parameters()))
    fixed = LatentDiTComposerModel(LatentDiTConfig(**{**DIT_CFG.__dict__, "latent_std": 2.5}), vae, CONDITIONS)
    fixed(batch)
    assert float(fixed.latent_std) == 2.5
    model.eval()
    model.reset_eval_noise()
    first = model.eval_forward(batch)
    model.reset_eval_noise()
    assert torch.equal(model.eval_forward(batch).loss, first.loss)
    metric = model.get_metrics()["flow_mse"]
    model.update_metric(batch, first, metric)
    assert float(metric.compute()) == pytest.approx(float(first.loss), rel=1e-5)  # every cell has m * d values


def run_config(yaml_name: str, *overrides: str) -> RunConfig:
    return load_config(RunConfig, ROOT / "yamls" / yaml_name, ["data.streams.demo.remote=/nonexistent", *overrides])


def test_run_config_family_switch_is_strict():
    assert run_config("demo_cpu.yaml").family == "masked"
    assert run_config("latent_vae_demo_cpu.yaml").latent_vae.n_latents == 16
    for bad, message in [
        (["family=latent"], "family"),
        (["latent_vae.n_latent=3"], "did you mean 'n_latents'"),
        (["latent_dit.vae="], "latent_dit.vae"),
        (["trainer.preview_interval=10ba"], "preview_interval"),
    ]:
        with pytest.raises(ConfigError, match=message):
            run_config("latent_dit_demo_cpu.yaml", *bad)


def test_latent_dit_run_reads_the_vae_run_config_and_weights(tmp_path):
    torch.manual_seed(0)
    vae_run = run_config("latent_vae_demo_cpu.yaml", "latent_vae.d_model=32", "latent_vae.n_latents=3")
    folder = tmp_path / "vae"
    folder.mkdir()
    save_config(vae_run, folder / "config.yaml")
    vae = LatentVAE(vae_run.latent_vae, vae_run.model.gene_vocab_size)
    torch.save(
        {"state": {"model": {f"model.{k}": v for k, v in vae.state_dict().items()}}}, folder / "ep0-ba4-rank0.pt"
    )
    (folder / "latest-rank0.pt").symlink_to("ep0-ba4-rank0.pt")
    config = resolve_latent_vae(run_config("latent_dit_demo_cpu.yaml", f"latent_dit.vae={folder}"))
    assert config.latent_vae == vae_run.latent_vae  # the saved DiT run describes its VAE
    labels = LabelVocab({"cell_line_id": ["A", "B"], "drug": ["x"], "dose": ["0.1"]})
    config = dataclasses.replace(config, model=resolve_model_config(config.model, labels))
    model = build_composer_model(config, None)
    assert isinstance(model, LatentDiTComposerModel) and model.model.n_latents == 3
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in model.vae.state_dict().items())
    with pytest.raises(ConfigError, match="gene vocabulary"):
        resolve_latent_vae(
            run_config("latent_dit_demo_cpu.yaml", f"latent_dit.vae={folder}", "model.gene_vocab_size=9")
        )
    with pytest.raises(ValueError, match="export the latent_dit run"):
        export_checkpoint(folder, tmp_path / "hf")
    with pytest.raises(ConfigError, match="not a latent_vae run"):
        save_config(run_config("demo_cpu.yaml"), folder / "config.yaml")
        read_vae_run(str(folder))
    with pytest.raises(ConfigError, match="not found"):
        read_vae_run(str(tmp_path / "missing"))


def test_latent_package_imports_only_lower_layers():
    graph = import_graph()
    latent = {m: ts for m, ts in graph.items() if m.startswith("ddsc.latent")}
    assert len(latent) >= 6
    allowed = ("ddsc.latent", "ddsc.model", "ddsc.data", "ddsc.diffusion", "ddsc.config", "ddsc.errors")
    assert sorted(f"{m} -> {t}" for m, ts in latent.items() for t in ts if not t.startswith(allowed)) == []


def test_both_stages_train_with_the_composer_engine(tmp_path):
    """VAE, then the latent DiT on the VAE run's save folder: the same MDS data, loaders and engine as the DiT."""
    from train_data import SMALL_VAE, latent_overrides, small_latent_dit, write_mds

    from ddsc.train.trainer import check_data, train

    write_mds(tmp_path / "mds", n_train=32, n_valid=8)
    common = [*latent_overrides(tmp_path / "mds"), "trainer.max_duration=4ba", "trainer.eval_interval=4ba"]
    common += ["trainer.save_interval=4ba", "trainer.precision=fp32", "trainer.log_to_console=false"]
    common.append(f"trainer.save_folder={tmp_path}/{{run_name}}")
    vae_config = load_config(RunConfig, ROOT / "yamls" / "latent_vae_demo_cpu.yaml", [*common, *SMALL_VAE])
    check_data(vae_config)
    vae = train(vae_config)
    assert vae.batches == 4 and np.isfinite(vae.metrics["eval/nb_nll"]) and vae.metrics["eval/kl"] >= 0
    dit_args = [*common, *small_latent_dit(tmp_path / "latent-vae-demo"), "trainer.hf_export_interval=4ba"]
    dit_config = load_config(RunConfig, ROOT / "yamls" / "latent_dit_demo_cpu.yaml", dit_args)
    check_data(dit_config)
    dit = train(dit_config)
    assert dit.batches == 4 and 0 < dit.metrics["eval/flow_mse"] < 10
    saved = read_vae_run(str(tmp_path / "latent-vae-demo"))
    resolved = load_config(RunConfig, tmp_path / "latent-dit-demo" / "config.yaml")
    assert resolved.latent_vae == saved.latent_vae and resolved.family == "latent_dit"
    state = torch.load(tmp_path / "latent-dit-demo" / "latest-rank0.pt", map_location="cpu", weights_only=False)
    assert float(state["state"]["model"]["latent_std"]) > 0  # the latent scale is kept in the checkpoint
    # the periodic export of the live model is the folder `ddsc export` writes from the checkpoint
    from ddsc.latent.hf import DDSCLatentModel

    export_checkpoint(tmp_path / "latent-dit-demo", tmp_path / "exported")
    periodic = DDSCLatentModel.from_pretrained(tmp_path / "latent-dit-demo" / "hf" / "ba4")
    exported = DDSCLatentModel.from_pretrained(tmp_path / "exported")
    differing = [k for k, v in periodic.config.to_dict().items() if exported.config.to_dict()[k] != v]
    assert differing == ["_name_or_path"]
    want = exported.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in periodic.state_dict().items()) and len(want) > 20


def test_both_stages_run_with_bf16_parameters():
    """FSDP mixed precision hands the modules bf16 parameters while the residual streams, norms and the NB
    likelihood stay float32 (``Float32LayerNorm``, ``Float32Linear``): the bf16 models' losses and gradients
    stay within 3% of the float32 ones with the same (perturbed, non-trivial) weights."""
    torch.manual_seed(0)
    vae = LatentVAE(VAE_CFG, VOCAB)
    dit = LatentDiTComposerModel(DIT_CFG, vae, CONDITIONS)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = collator_batch()
    for model, loss in ((vae, lambda m: m.loss(batch).loss), (dit, lambda m: m(batch).loss)):
        reference = float(loss(model))
        low = copy_to_bf16(model)
        value = loss(low)
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert abs(float(value) - reference) <= 0.03 * abs(reference), (float(value), reference)


def copy_to_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with bf16 parameters and the buffers as they were, as FSDP2's ``MixedPrecisionPolicy(param_dtype=
    torch.bfloat16)`` gathers them for the forward."""
    import copy

    low = copy.deepcopy(model)
    for p in low.parameters():
        p.data = p.data.to(torch.bfloat16)
    return low
