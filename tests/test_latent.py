"""The latent-diffusion family: NB likelihood, set-encoder VAE, rectified flow with guidance, latent DiT."""

import numpy as np
import pytest
import torch
from scipy import special, stats

from ddsc.config import ConfigError
from ddsc.latent.config import LatentDiTConfig, LatentVAEConfig
from ddsc.latent.flow import RectifiedFlow, initial_noise
from ddsc.latent.latent_dit import LatentDiT
from ddsc.latent.nb import nb_log_prob, nb_log_prob_log_space
from ddsc.latent.vae import LatentVAE
from ddsc.model.config import ConditionConfig
from ddsc.model.dit import DiT

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
