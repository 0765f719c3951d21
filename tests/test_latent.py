"""The latent-diffusion family: NB likelihood, set-encoder VAE, rectified flow with guidance, latent DiT."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import special, stats
from test_layers import import_graph

from ddsc.config import ConfigError, load_config, save_config
from ddsc.data.binning_config import BinningConfig
from ddsc.data.collator import CellCollator
from ddsc.data.labels import LabelVocab
from ddsc.latent.config import LatentDiTConfig, LatentVAEConfig
from ddsc.latent.flow import RectifiedFlow, initial_noise
from ddsc.latent.latent_dit import LatentDiT
from ddsc.latent.nb import nb_log_prob, nb_log_prob_log_space
from ddsc.latent.vae import LatentVAE
from ddsc.model.config import ConditionConfig
from ddsc.model.dit import DiT
from ddsc.train.builders import build_composer_model, parameter_groups
from ddsc.train.config import RunConfig
from ddsc.train.export import export_checkpoint
from ddsc.train.latent_models import LatentDiTComposerModel, LatentVAEComposerModel, read_vae_run
from ddsc.train.run import resolve_latent_vae, resolve_model_config

ROOT = Path(__file__).resolve().parents[1]

VOCAB = 60
VAE_CFG = LatentVAEConfig(d_model=32, n_heads=4, n_latents=4, d_latent=6, encoder_layers=1, decoder_layers=1)
DIT_CFG = LatentDiTConfig(d_model=32, n_heads=4, n_layers=2, sampler_steps=6)
CONDITIONS = [ConditionConfig("cell_line_id", num_labels=3, dropout=0.5), ConditionConfig("drug", num_labels=2)]


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small gain nothing from intra-op threads, and on a loaded 2-core machine the threads' spin
    waits made a 30-step test 100x slower; restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(cells: int = 5, genes: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """A collator-layout batch: ``<cls>`` at 0, then real genes, padding at the end of the shorter cells."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, genes + 1, (cells,), generator=g)
    real = torch.arange(genes + 1)[None, :] - 1 < lengths[:, None]
    real[:, 0] = False
    gene_ids = torch.stack([torch.randperm(VOCAB - 3, generator=g)[: genes + 1] + 3 for _ in range(cells)])
    gene_ids = torch.where(real, gene_ids, 0)
    gene_ids[:, 0] = 1
    counts = torch.where(real, torch.poisson(torch.full((cells, genes + 1), 3.0), generator=g), 0.0)
    attention_mask = real.clone()
    attention_mask[:, 0] = True
    return {"gene_ids": gene_ids, "counts": counts, "real": real, "attention_mask": attention_mask}


# --- negative binomial ---------------------------------------------------------------------------------------


def test_nb_log_prob_equals_scipy_nbinom():
    x = torch.tensor([0, 1, 2, 5, 17, 250, 0, 3], dtype=torch.float64)
    mu = torch.tensor([0.1, 1.0, 3.0, 5.0, 20.0, 300.0, 1e-3, 1e4], dtype=torch.float64)
    theta = torch.tensor([0.5, 2.0, 10.0, 1.0, 0.1, 50.0, 3.0, 1e3], dtype=torch.float64)
    expected = stats.nbinom.logpmf(x.numpy(), n=theta.numpy(), p=(theta / (theta + mu)).numpy())
    got = nb_log_prob(x, mu, theta)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-5, atol=2e-5)


def test_zinb_is_the_mixture_with_a_point_mass_at_zero():
    x = torch.tensor([0.0, 0.0, 1.0, 4.0, 9.0])
    mu, theta = torch.tensor([2.0, 0.5, 2.0, 6.0, 1.0]), torch.tensor([1.5, 4.0, 1.5, 0.7, 9.0])
    logits = torch.tensor([-2.0, 1.0, 0.3, -30.0, 40.0])
    pi, not_pi = special.expit(logits.double().numpy()), special.expit(-logits.double().numpy())  # 1 - pi exactly
    nb = stats.nbinom.pmf(x.numpy(), n=theta.numpy(), p=(theta / (theta + mu)).numpy())
    expected = np.log(np.where(x.numpy() == 0, pi + not_pi * nb, not_pi * nb))
    got = nb_log_prob(x, mu, theta, logits)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(nb_log_prob_log_space(torch.zeros(2), torch.tensor([-80.0, 30.0]), torch.zeros(2))).all()


def test_nb_under_bf16_autocast_is_still_float32():
    x, mu, theta = torch.tensor([3.0, 1000.0]), torch.tensor([2.5, 990.0]), torch.tensor([2.0, 20.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nb_log_prob(x.bfloat16().float(), mu, theta)
    torch.testing.assert_close(got, nb_log_prob(x, mu, theta))


# --- VAE ----------------------------------------------------------------------------------------------------


def test_set_encoder_is_permutation_invariant_over_gene_positions():
    torch.manual_seed(0)
    vae = LatentVAE(VAE_CFG, VOCAB).eval()
    batch = make_batch()
    for block in vae.blocks:  # non-zero adaLN so that the self-attention blocks are not the identity
        torch.nn.init.normal_(block.adaln[-1].bias, std=0.1)
    order = torch.cat([torch.tensor([0]), torch.randperm(batch["gene_ids"].shape[1] - 1) + 1])
    permuted = {k: v[:, order] for k, v in batch.items()}
    a, b = vae.encode(batch), vae.encode(permuted)
    torch.testing.assert_close(a.mean, b.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.logvar, b.logvar, atol=1e-5, rtol=0)
    assert a.mean.shape == (5, VAE_CFG.n_latents, VAE_CFG.d_latent)
    changed = dict(batch, counts=batch["counts"] + batch["real"])  # the counts matter
    assert (vae.encode(changed).mean - a.mean).abs().max() > 1e-4


def test_decoder_answers_any_panel_and_a_gene_does_not_depend_on_the_others():
    torch.manual_seed(0)
    vae = LatentVAE(LatentVAEConfig(**{**VAE_CFG.__dict__, "zero_inflated": True}), VOCAB).eval()
    torch.nn.init.normal_(vae.head.weight, std=0.5)  # trained-like head: outputs depend on the latents
    z = torch.randn(2, VAE_CFG.n_latents, VAE_CFG.d_latent)
    log_lib = torch.tensor([5.0, 7.5])
    small = torch.tensor([[5, 9, 11], [5, 9, 11]])
    large = torch.cat([torch.arange(3, VOCAB)[None].expand(2, -1), small], dim=1)  # the whole vocabulary too
    a, b = vae.decode(z, small, log_lib), vae.decode(z, large, log_lib)
    assert a.log_mu.shape == (2, 3) and b.log_mu.shape == (2, VOCAB - 3 + 3) and b.zi_logits.shape == b.log_mu.shape
    torch.testing.assert_close(a.log_mu, b.log_mu[:, -3:], atol=1e-6, rtol=0)
    torch.testing.assert_close(a.zi_logits, b.zi_logits[:, -3:], atol=1e-6, rtol=0)
    torch.testing.assert_close(a.log_theta, b.log_theta[:, -3:])
    # log-rate + log library: doubling the library doubles every mean
    doubled = vae.decode(z, small, log_lib + np.log(2.0))
    assert (doubled.log_mu - a.log_mu - np.log(2.0)).abs().max() < 0.5  # the library MLP may shift it a little
    assert (a.log_mu[0] - a.log_mu[1]).abs().max() > 1e-3  # the latents matter


def test_a_few_vae_steps_lower_the_loss():
    torch.manual_seed(0)
    vae = LatentVAE(VAE_CFG, VOCAB)
    batch = make_batch(cells=8, seed=1)
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        out = vae.loss(batch, generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def test_vae_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="n_heads"):
        LatentVAEConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="beta"):
        LatentVAEConfig(beta=-1.0)
    with pytest.raises(ConfigError, match="latent_std"):
        LatentDiTConfig(latent_std=0.0)
    with pytest.raises(ConfigError, match="n_latents"):
        LatentVAEConfig(n_latents=0)


# --- flow and latent DiT ------------------------------------------------------------------------------------


def test_flow_loss_of_a_perfect_denoiser_is_zero():
    flow = RectifiedFlow(DIT_CFG)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(16, 4, 6, generator=g), torch.randn(16, 4, 6, generator=g)
    t = flow.sample_time(16, x0.device, g)

    def oracle(x_t, t_, cond):
        assert torch.equal(t_, t)
        torch.testing.assert_close(x_t, (1 - t_[:, None, None]) * x0 + t_[:, None, None] * noise)
        return noise - x0

    assert float(flow.loss(oracle, x0, t=t, noise=noise).loss) < 1e-10
    assert float(flow.loss(lambda x_t, t_, c: torch.zeros_like(x_t), x0, t=t, noise=noise).loss) > 0.5
    # stratified times: one per 1/16 of [0, 1]
    assert sorted((t * 16).floor().long().tolist()) == list(range(16))


def test_euler_sampler_follows_a_straight_path_exactly():
    """With the true velocity of a single target ``x0`` (v = (x_t - x0) / t), Euler steps land on x0."""
    flow = RectifiedFlow(DIT_CFG)
    x0 = torch.randn(3, 4, 6)
    noise = initial_noise(3, (4, 6), torch.Generator().manual_seed(1))
    out = flow.sample(lambda x, t, c: (x - x0) / t[:, None, None], noise, steps=5)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def _dit(seed: int = 0) -> LatentDiT:
    torch.manual_seed(seed)
    model = LatentDiT(DIT_CFG, VAE_CFG.n_latents, VAE_CFG.d_latent, CONDITIONS)
    for module in model.modules():  # break adaLN-Zero's identity start so conditions change the output
        if isinstance(module, torch.nn.Linear) and module.weight.abs().sum() == 0:
            torch.nn.init.normal_(module.weight, std=0.05)
    return model.eval()


def test_latent_dit_reuses_the_dit_conditioning_and_shapes():
    assert LatentDiT.condition is DiT.condition and LatentDiT.fsdp_wrap_fn is DiT.fsdp_wrap_fn
    model = _dit()
    x, t = torch.randn(3, 4, 6), torch.rand(3)
    cond = torch.tensor([[1, 2], [2, 1], [3, 0]])
    v = model(x, t, cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert (v - model(x, t, torch.zeros_like(cond))).abs().max() > 1e-4  # conditions matter
    torch.testing.assert_close(model(x, t, None), model(x, t, torch.zeros_like(cond)))  # None = all null
    fresh = LatentDiT(DIT_CFG, VAE_CFG.n_latents, VAE_CFG.d_latent, CONDITIONS)
    assert fresh(x, t, cond).abs().max() == 0  # adaLN-Zero + zero head: the start predicts zero velocity
    with pytest.raises(ValueError, match="latents have shape"):
        model(torch.randn(3, 5, 6), t, cond)


def test_guidance_zero_is_unconditional_and_one_is_conditional_exactly():
    model, flow = _dit(), RectifiedFlow(DIT_CFG)
    cond = torch.tensor([[1, 2], [2, 1], [3, 2]])

    def draw(w: float, c):
        noise = initial_noise(3, (4, 6), torch.Generator().manual_seed(7))
        return flow.sample(model, noise, c, guidance_scale=w)

    def euler(c):  # the plain model's Euler sampler, written out
        x = initial_noise(3, (4, 6), torch.Generator().manual_seed(7))
        times = torch.linspace(1.0, 0.0, DIT_CFG.sampler_steps + 1)
        with torch.no_grad():
            for t, t_next in zip(times[:-1], times[1:], strict=True):
                x = x + (t_next - t) * model(x, t.expand(3), c)
        return x

    conditional, unconditional = euler(cond), euler(torch.zeros_like(cond))
    assert torch.equal(draw(0.0, cond), unconditional)
    assert torch.equal(draw(1.0, cond), conditional)
    assert not torch.allclose(conditional, unconditional)
    assert torch.equal(draw(2.0, cond), draw(2.0, cond))  # reproducible from the seed
    assert not torch.allclose(draw(2.0, cond), conditional)


def test_conditions_are_dropped_to_null_in_training_mode_only():
    model = _dit()
    cond = torch.tensor([[1, 2]]).expand(256, -1)
    t = torch.full((256,), 0.5)
    model.train()
    c_train = model.condition(256, torch.device("cpu"), cond, t)
    model.eval()
    c_eval = model.condition(256, torch.device("cpu"), cond, t)
    assert torch.equal(c_eval, c_eval[:1].expand(256, -1))
    dropped = (c_train - c_eval).abs().amax(dim=1) > 1e-6
    assert 0.3 < dropped.float().mean() < 0.9  # cell line dropout 0.5, drug 0.1


# --- Composer wrappers and the run config --------------------------------------------------------------------


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
        (["parallelism.engine=deepspeed"], "composer engine only"),
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
    with pytest.raises(ValueError, match="latent family is not done yet"):
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
    from train_data import write_mds

    from ddsc.train.trainer import check_data, train

    write_mds(tmp_path / "mds", n_train=32, n_valid=8)
    common = [
        f"data.streams.demo.remote={tmp_path / 'mds'}",
        "data.max_length=16",
        "data.num_workers=0",
        "model.gene_vocab_size=200",
        "model.conditions=[{name: cell_line_id}, {name: drug}]",
        "trainer.max_duration=4ba",
        "trainer.global_train_batch_size=8",
        "trainer.device_train_microbatch_size=4",
        "trainer.device_eval_batch_size=8",
        "trainer.eval_interval=4ba",
        "trainer.save_interval=4ba",
        "trainer.precision=fp32",
        "trainer.progress_bar=false",
        "trainer.log_to_console=false",
        f"trainer.save_folder={tmp_path}/{{run_name}}",
    ]
    small_vae = ["latent_vae.d_model=32", "latent_vae.n_latents=4", "latent_vae.d_latent=4"]
    vae_config = load_config(RunConfig, ROOT / "yamls" / "latent_vae_demo_cpu.yaml", [*common, *small_vae])
    check_data(vae_config)
    vae = train(vae_config)
    assert vae.batches == 4 and np.isfinite(vae.metrics["eval/nb_nll"]) and vae.metrics["eval/kl"] >= 0
    dit_args = [
        *common,
        f"latent_dit.vae={tmp_path / 'latent-vae-demo'}",
        "latent_dit.d_model=32",
        "latent_dit.n_layers=1",
    ]
    dit_config = load_config(RunConfig, ROOT / "yamls" / "latent_dit_demo_cpu.yaml", dit_args)
    check_data(dit_config)
    dit = train(dit_config)
    assert dit.batches == 4 and 0 < dit.metrics["eval/flow_mse"] < 10
    saved = read_vae_run(str(tmp_path / "latent-vae-demo"))
    resolved = load_config(RunConfig, tmp_path / "latent-dit-demo" / "config.yaml")
    assert resolved.latent_vae == saved.latent_vae and resolved.family == "latent_dit"
    state = torch.load(tmp_path / "latent-dit-demo" / "latest-rank0.pt", map_location="cpu", weights_only=False)
    assert float(state["state"]["model"]["latent_std"]) > 0  # the latent scale is kept in the checkpoint
