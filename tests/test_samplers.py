"""Samplers: exactness against a known joint distribution, caching, inpainting, temperature, guidance."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ddsc.data.tokens import GENE_CLS, ExpressionTokens
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.samplers import guided_log_probs, sample
from ddsc.diffusion.schedule import make_schedule
from ddsc.model.config import ConditionConfig, ModelConfig
from ddsc.model.dit import DiT

K = 3
TOKENS = ExpressionTokens(K)
# A strongly correlated joint distribution of two genes' bins: far from the product of its marginals.
JOINT = torch.tensor([[0.30, 0.02, 0.03], [0.05, 0.20, 0.05], [0.01, 0.04, 0.30]], dtype=torch.float64)
N = 4000


class JointOracle(nn.Module):
    """The exact denoiser of JOINT: p(x_i | the other gene), or its marginal when the other gene is masked."""

    def __init__(self, time_conditioning: bool = False):
        super().__init__()
        self.cfg = SimpleNamespace(num_bins=K, time_conditioning=time_conditioning)
        self.calls = 0

    def forward(self, gene_ids, expr, attention_mask, cond=None, t=None):
        self.calls += 1
        log_joint = JOINT.log()
        x1, x2 = expr[:, 1], expr[:, 2]
        first = torch.where((x2 == TOKENS.mask)[:, None], JOINT.sum(1).log(), log_joint.T[x2.clamp(max=K - 1)])
        second = torch.where((x1 == TOKENS.mask)[:, None], JOINT.sum(0).log(), log_joint[x1.clamp(max=K - 1)])
        logits = torch.stack([torch.zeros_like(first), first, second], dim=1)
        return logits.float()


def two_gene_batch(n=N):
    gene_ids = torch.tensor([[GENE_CLS, 10, 11]]).repeat(n, 1)
    expr = torch.tensor([[TOKENS.cls, 0, 0]]).repeat(n, 1)
    real = torch.tensor([[False, True, True]]).repeat(n, 1)
    return {"gene_ids": gene_ids, "expr": expr, "real": real, "attention_mask": torch.ones(n, 3, dtype=torch.bool)}


def joint_frequencies(expr: torch.Tensor) -> torch.Tensor:
    assert expr[:, 1:].max() < K, "a position was left masked"
    return torch.bincount(expr[:, 1] * K + expr[:, 2], minlength=K * K).reshape(K, K).double() / len(expr)


def assert_matches(frequencies: torch.Tensor, expected: torch.Tensor, n: int = N):
    tolerance = 4.5 * (expected * (1 - expected) / n).sqrt() + 1e-9
    assert ((frequencies - expected).abs() <= tolerance).all(), f"{frequencies} vs {expected}"


@pytest.mark.parametrize("steps", [1, 4, 1000])
def test_ancestral_sampler_reproduces_the_oracle_joint(steps):
    """Log-linear schedule, uniform grid: each token unmasks in a uniformly random step; two tokens share a step
    with probability 1/steps and are then drawn independently, so the samples follow
    (1 - 1/steps) * JOINT + 1/steps * product of marginals (the product at steps=1, JOINT as steps grow)."""
    out = sample(
        JointOracle(), two_gene_batch(), method="ancestral", steps=steps, generator=torch.Generator().manual_seed(0)
    )
    product = JOINT.sum(1)[:, None] * JOINT.sum(0)[None, :]
    assert_matches(joint_frequencies(out.expr), (1 - 1 / steps) * JOINT + product / steps)
    if steps < 1000:  # the test can fail: these samples are far from the oracle's joint
        assert ((joint_frequencies(out.expr) - JOINT).abs() > 0.04).any()


def test_first_hitting_is_exact_with_one_token_per_step():
    out = sample(
        JointOracle(), two_gene_batch(), method="first_hitting", steps=2, generator=torch.Generator().manual_seed(1)
    )
    assert_matches(joint_frequencies(out.expr), JOINT)
    assert out.nfe == 2 and out.nfe_per_cell == 2


def test_inpainting_samples_the_conditional_and_never_moves_observed_tokens():
    batch = two_gene_batch()
    batch["expr"][:, 1] = 2
    observed = torch.tensor([[False, True, False]]).repeat(N, 1)
    for method in ("ancestral", "first_hitting", "confidence"):
        out = sample(JointOracle(), batch, method=method, steps=10, observed=observed, return_trajectory=True)
        assert all((state[:, :2] == batch["expr"][:, :2]).all() for state in out.trajectory)
        if method != "confidence":
            second = torch.bincount(out.expr[:, 2], minlength=K).double() / N
            assert_matches(second, JOINT[2] / JOINT[2].sum())


def test_ddpm_cache_evaluates_a_cell_only_after_it_changed():
    oracle = JointOracle()
    out = sample(oracle, two_gene_batch(n=1), method="ancestral", steps=500, return_trajectory=True)
    changes = sum(not torch.equal(a, b) for a, b in zip(out.trajectory, out.trajectory[1:], strict=False))
    assert out.nfe == oracle.calls == changes <= 2
    # Per cell: one evaluation at the start, one more if its two genes unmask in different steps (p = 1 - 1/500).
    out = sample(JointOracle(), two_gene_batch(n=1000), method="ancestral", steps=500)
    assert 2 - 1 / 500 - 0.02 < out.nfe_per_cell <= 2
    # A time-conditioned denoiser cannot be cached: one evaluation per step until everything is unmasked.
    timed = JointOracle(time_conditioning=True)
    out = sample(timed, two_gene_batch(n=1), method="ancestral", steps=500, return_trajectory=True)
    last_masked = max(i for i, state in enumerate(out.trajectory) if (state == TOKENS.mask).any())
    assert out.nfe == timed.calls == last_masked + 1 > changes


def test_temperature_sharpens_the_marginals():
    marginal = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    oracle = JointOracle()
    oracle.forward = lambda gene_ids, expr, *args: marginal.log().float().expand(len(expr), 3, K)
    out = sample(oracle, two_gene_batch(), method="first_hitting", steps=2, temperature=0.5)
    sharpened = marginal**2 / (marginal**2).sum()
    assert_matches(torch.bincount(out.expr[:, 1:].flatten(), minlength=K).double() / (2 * N), sharpened, 2 * N)


def conditioned_dit() -> tuple[DiT, dict]:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(
        "tiny",
        gene_vocab_size=40,
        num_bins=5,
        conditions=[ConditionConfig("drug", 0.5, 3), ConditionConfig("dose", 0.5, 2)],
    )
    model = DiT(cfg)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    tokens = ExpressionTokens(5)
    g = torch.Generator().manual_seed(1)
    gene_ids = torch.randint(3, 40, (4, 8), generator=g)
    gene_ids[:, 0] = GENE_CLS
    real = torch.ones(4, 8, dtype=torch.bool)
    real[:, 0] = False
    real[1, 5:] = False
    expr = torch.where(real, torch.randint(0, 5, (4, 8), generator=g), tokens.pad)
    expr[:, 0] = tokens.cls
    batch = {"gene_ids": gene_ids, "expr": expr, "real": real, "attention_mask": real | ~real.cumsum(1).bool()}
    batch["attention_mask"][:, 0] = True
    batch["cond"] = torch.tensor([[1, 2], [3, 1], [2, 2], [1, 1]])
    return model, batch


def test_guidance_scale_zero_and_one_recover_uncond_and_cond():
    model, batch = conditioned_dit()
    model.eval()
    x = batch["expr"].masked_fill(batch["real"], 5)
    t = torch.full((4,), 0.5)
    args = (batch["gene_ids"], x, batch["attention_mask"])
    cond = model(*args, batch["cond"], t).double().log_softmax(-1)
    uncond = model(*args, torch.zeros_like(batch["cond"]), t).double().log_softmax(-1)
    assert (cond - uncond).abs().max() > 1e-2
    torch.testing.assert_close(guided_log_probs(model, batch, x, t, 1.0)[0], cond)
    torch.testing.assert_close(guided_log_probs(model, batch, x, t, 0.0)[0], uncond)
    guided, passes = guided_log_probs(model, batch, x, t, 3.0, temperature=2.0)
    torch.testing.assert_close(guided, ((uncond + 3 * (cond - uncond)) / 2).log_softmax(-1))
    assert passes == 2


def test_dit_inpainting_all_methods_and_mode_restored():
    model, batch = conditioned_dit()
    model.train()
    observed = torch.rand(4, 8, generator=torch.Generator().manual_seed(2)) < 0.5
    observed &= batch["real"]
    for method in ("ancestral", "first_hitting", "confidence"):
        out = sample(model, batch, method=method, steps=4, guidance_scale=2.0, observed=observed)
        assert torch.equal(out.expr[observed | ~batch["real"]], batch["expr"][observed | ~batch["real"]])
        assert (out.expr[batch["real"]] < 5).all()
        assert out.nfe <= 8 and out.nfe % 2 == 0  # guided: two passes per evaluation
    assert model.training


@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
def test_ordered_samplers_give_a_time_conditioned_model_the_schedules_time(schedule):
    """first_hitting / confidence tell the model the t at which the configured schedule masks the fraction of
    tokens still masked: for cosine that is not the fraction itself."""
    seen = []

    class Recorder(JointOracle):
        def forward(self, gene_ids, expr, attention_mask, cond=None, t=None):
            seen.append(t.clone())
            return super().forward(gene_ids, expr, attention_mask, cond, t)

    diffusion = DiffusionConfig(schedule=schedule)
    for method in ("first_hitting", "confidence"):
        seen.clear()
        sample(Recorder(time_conditioning=True), two_gene_batch(n=1), method=method, steps=2, diffusion=diffusion)
        expected = make_schedule(diffusion).time_of(torch.tensor([1.0, 0.5], dtype=torch.float64))
        torch.testing.assert_close(torch.cat(seen).double(), expected, rtol=0, atol=1e-6)
    assert (expected[1].item() - 0.5 > 0.1) == (schedule == "cosine")  # cosine masks slowly at first
