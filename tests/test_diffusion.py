"""MDLM loss: closed forms on hand-built logits, the two analytic extremes, masking rules, schedules, t."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ddsc.data.tokens import GENE_CLS, ExpressionTokens
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.masked_diffusion import MaskedDiffusion
from ddsc.diffusion.schedule import make_schedule

K = 5
TOKENS = ExpressionTokens(K)


class FixedLogits(nn.Module):
    """A denoiser whose logits do not depend on its input: the loss must be a closed form of them."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, gene_ids, expr, attention_mask, cond=None, t=None):
        return self.logits


def make_batch(batch_size=64, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length, (batch_size,), generator=g)
    real = (torch.arange(length)[None, :] >= 1) & (torch.arange(length)[None, :] <= lengths[:, None])
    expr = torch.where(real, torch.randint(0, K, (batch_size, length), generator=g), TOKENS.pad)
    expr[:, 0] = TOKENS.cls
    gene_ids = torch.where(real, torch.randint(3, 100, (batch_size, length), generator=g), 0)
    gene_ids[:, 0] = GENE_CLS
    attention_mask = real.clone()
    attention_mask[:, 0] = True
    return {"gene_ids": gene_ids, "expr": expr, "real": real, "attention_mask": attention_mask}


def test_loss_equals_closed_form_on_hand_built_logits():
    batch = make_batch()
    logits = torch.randn(*batch["expr"].shape, K, generator=torch.Generator().manual_seed(1))
    diffusion = MaskedDiffusion(DiffusionConfig(), K)
    out = diffusion.loss(FixedLogits(logits), batch, generator=torch.Generator().manual_seed(2))
    # Recompute independently in numpy from the masked positions the loss reports.
    z, x0, m = logits.double().numpy(), batch["expr"].numpy(), out.masked.numpy()
    t = out.t.double().numpy()
    ce = np.log(np.exp(z).sum(-1)) - np.take_along_axis(z, np.minimum(x0, K - 1)[..., None], -1)[..., 0]
    expected = (ce * m / t[:, None]).sum() / batch["real"].sum().item()
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.ce_sum.item() == pytest.approx((ce * m).sum(), rel=1e-9)
    assert out.correct.item() == int(((z.argmax(-1) == x0) & m).sum())
    assert out.correct_pm1.item() == int(((np.abs(z.argmax(-1) - x0) <= 1) & m).sum())
    assert out.num_masked.item() == m.sum() > 0 and out.num_real.item() == batch["real"].sum().item()


def test_perfect_denoiser_has_zero_loss():
    batch = make_batch()
    logits = 50.0 * nn.functional.one_hot(batch["expr"].clamp(max=K - 1), K).float()
    out = MaskedDiffusion(DiffusionConfig(), K).loss(FixedLogits(logits), batch)
    assert out.loss.item() < 1e-12 and out.correct == out.correct_pm1 == out.num_masked


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "linear"])
def test_uniform_logits_give_the_analytic_nelbo(schedule):
    """Uniform predictions: per real token, E[weight(t) * 1{masked}] * log K = -alpha'(t) log K."""
    batch = make_batch(batch_size=2000, length=40)
    diffusion = MaskedDiffusion(DiffusionConfig(schedule=schedule), K)
    # Seeded: over 20 seeds the linear schedule's estimate spread 0.95-1.03 of its expectation (the widest of
    # the three), so an unseeded draw could land outside the 5% below (one did: 0.943).
    generator = torch.Generator().manual_seed(0)
    out = diffusion.loss(FixedLogits(torch.zeros(*batch["expr"].shape, K)), batch, generator=generator)
    # Exact given the sampled masks:
    weights = diffusion.schedule.weight(out.t.double())
    exact = (weights[:, None] * out.masked).sum() * math.log(K) / batch["real"].sum()
    assert out.loss.item() == pytest.approx(exact.item(), rel=1e-6)
    assert out.ce_sum.item() == pytest.approx(out.num_masked.item() * math.log(K), rel=1e-6)
    # In expectation over masks and (stratified) t the NELBO is (alpha(t_min) - alpha(1)) log K ~= (1 - eps) log K.
    assert out.loss.item() == pytest.approx((1 - 1e-3) * math.log(K), rel=0.05)


def test_only_real_positions_are_masked():
    batch = make_batch(batch_size=256)
    diffusion = MaskedDiffusion(DiffusionConfig(), K)
    for t in (0.05, 0.5, 1.0):
        noisy, masked = diffusion.corrupt(batch["expr"], batch["real"], torch.full((256,), t))
        assert not (masked & ~batch["real"]).any()
        assert torch.equal(noisy == TOKENS.mask, masked) and torch.equal(noisy[~masked], batch["expr"][~masked])
        rate = masked.sum() / batch["real"].sum()
        assert rate.item() == pytest.approx((1 - 1e-3) * t, abs=0.03)


def test_antithetic_t_is_stratified():
    diffusion = MaskedDiffusion(DiffusionConfig(eps=1e-3), K)
    t = diffusion.sample_t(16, "cpu", torch.Generator().manual_seed(0)).sort().values
    assert t.min() >= 1e-3 and t.max() <= 1
    torch.testing.assert_close(t.diff(), torch.full((15,), (1 - 1e-3) / 16))
    iid = MaskedDiffusion(DiffusionConfig(antithetic=False), K).sample_t(16, "cpu", torch.Generator().manual_seed(0))
    assert iid.sort().values.diff().std() > 1e-3


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "linear"])
def test_schedule_weight_is_minus_alpha_prime_over_one_minus_alpha(schedule):
    s = make_schedule(DiffusionConfig(schedule=schedule, eps=1e-3))
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(s.alpha(t).sum(), t)
    torch.testing.assert_close(s.alpha_prime(t), grad)
    torch.testing.assert_close(s.weight(t), -grad / (1 - s.alpha(t)))
    ends = s.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([1.0, 1e-3], dtype=torch.float64))


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "linear"])
def test_time_of_inverts_the_masked_fraction(schedule):
    s = make_schedule(DiffusionConfig(schedule=schedule, eps=1e-3))
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    torch.testing.assert_close(s.time_of(1 - s.alpha(t)), t, rtol=0, atol=1e-7)
    assert s.time_of(torch.tensor([1.0], dtype=torch.float64)).item() == pytest.approx(1.0, abs=1e-12)  # all masked
