"""The optimizer builder: torch's (fused / foreach) AdamW reproduces Composer's DecoupledAdamW; decay groups."""

from __future__ import annotations

import pytest
import torch
from composer.optim import DecoupledAdamW
from test_model import random_model

from ddsc.model.config import ConditionConfig
from ddsc.train.builders import build_optimizer, lr_multiplier, parameter_groups
from ddsc.train.config import OptimizerConfig, SchedulerConfig


def test_parameter_groups_decay_linear_weights_only():
    model = random_model(conditions=[ConditionConfig("drug", num_labels=3)], time_conditioning=True)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decayed == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) for n in [f"{n}.weight"]}
    assert "cond_embeddings.0.weight" not in decayed and "gene_embedding.weight" not in decayed  # null row too
    assert not any(n.endswith(".bias") for n in decayed)


def fifty_steps(name: str, weight_decay: float) -> dict[str, torch.Tensor]:
    """The same 50 seeded gradients through the builder's optimizer, under warmup + cosine: the final weights."""
    schedule = SchedulerConfig(name="cosine_with_warmup", t_warmup="5ba", alpha_f=0.1)
    model = random_model().train()
    cfg = OptimizerConfig(name=name, lr=3e-3, weight_decay=weight_decay)
    optimizer = build_optimizer(cfg, model, "cpu")
    assert isinstance(optimizer, DecoupledAdamW) == (name == "decoupled_adamw")
    generator = torch.Generator().manual_seed(0)
    for step in range(50):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_multiplier(schedule, step, 50)
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator) * 0.1
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adamw_reproduces_decoupled_adamw_over_a_cosine_schedule(weight_decay):
    """Gradients come from a generator, not from a loss: through the model, a last-bit difference between the two
    kernels' arithmetic order is amplified by Adam on parameters whose true gradient is zero (an attention key
    bias), where the update is the sign of rounding noise; that would test the model, not the optimizer.
    """
    ours, reference = fifty_steps("adamw", weight_decay), fifty_steps("decoupled_adamw", weight_decay)
    start = random_model().state_dict()
    assert min((ours[k] - start[k]).abs().max() for k in start) > 1e-2  # every tensor moved
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)
    if weight_decay:  # the decay is really applied, to the linear weights only
        undecayed = fifty_steps("adamw", 0.0)
        assert not torch.allclose(ours["head.weight"], undecayed["head.weight"], atol=1e-5)
        assert torch.equal(ours["gene_embedding.weight"], undecayed["gene_embedding.weight"])
