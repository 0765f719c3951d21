"""torchrun script: the DiT sharded per block with FSDP2 and a bf16 ``MixedPrecisionPolicy`` (what Composer's
``mixed_precision: DEFAULT`` does on GPU) against the float32 model with the same weights, on the same cells,
times and masks. Writes the comparison as JSON (rank 0); ``tests/test_precision.py`` asserts on it.

Usage: torchrun --nproc_per_node=N tests/torchrun/fsdp_mixed_precision.py OUT.json
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.masked_diffusion import MaskedDiffusion
from ddsc.model.config import ConditionConfig, ModelConfig
from ddsc.model.dit import DiT
from ddsc.precision import autocast

K = 11


def batch_for(rank: int) -> dict[str, torch.Tensor]:
    """Each rank's own 4 cells of up to 24 genes (the last two padded), as the collator lays them out."""
    g = torch.Generator().manual_seed(100 + rank)
    gene_ids = torch.randint(3, 60, (4, 25), generator=g)
    expr = torch.randint(0, K, (4, 25), generator=g)
    gene_ids[:, 0], expr[:, 0] = 1, K + 2  # <cls> and its expression token
    attention_mask = torch.ones(4, 25, dtype=torch.bool)
    attention_mask[2, 18:] = attention_mask[3, 9:] = False
    real = attention_mask.clone()
    real[:, 0] = False
    cond = torch.randint(0, 4, (4, 2), generator=g)
    return {"gene_ids": gene_ids, "expr": expr, "attention_mask": attention_mask, "real": real, "cond": cond}


def loss_and_grads(model: torch.nn.Module, batch: dict, bf16_autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    diffusion = MaskedDiffusion(DiffusionConfig(), K)
    t = torch.linspace(0.2, 0.9, 4)
    with autocast("cpu", torch.bfloat16 if bf16_autocast else None):
        out = diffusion.loss(model, batch, t=t, generator=torch.Generator().manual_seed(7))
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = grad.float()
    return out.loss.item(), grads


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=64,
        n_layers=2,
        n_heads=4,
        gene_vocab_size=60,
        num_bins=K,
        time_conditioning=True,
        conditions=[
            ConditionConfig("line", dropout=0.0, num_labels=3),
            ConditionConfig("drug", dropout=0.0, num_labels=3),
        ],
    )
    reference = DiT(cfg).train()
    for p in reference.parameters():  # every weight non-zero: adaLN-Zero and the zero head would hide errors
        torch.nn.init.normal_(p, std=0.05)
    sharded = copy.deepcopy(reference)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in sharded.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(sharded, mp_policy=policy)

    batch = batch_for(rank)
    ref_loss, ref_grads = loss_and_grads(reference, batch, bf16_autocast=False)
    for grad in ref_grads.values():  # FSDP averages gradients over ranks: so does the reference
        dist.all_reduce(grad)
        grad /= world
    report = {"world": world, "fp32_loss": ref_loss}
    for mode, with_autocast in (("bf16_params", False), ("bf16_params_autocast", True)):
        loss, grads = loss_and_grads(sharded, batch, with_autocast)
        cosines = [torch.nn.functional.cosine_similarity(grads[k].flatten(), ref_grads[k].flatten(), 0) for k in grads]
        report[mode] = {
            "loss": loss,
            "finite": all(bool(torch.isfinite(g).all()) for g in grads.values()),
            "min_grad_cosine": min(float(c) for c in cosines),
            "worst": sorted(zip([float(c) for c in cosines], grads, strict=True))[:4],
            "grad_dtypes": sorted({str(p.grad.dtype) for p in sharded.parameters()}),
        }
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
