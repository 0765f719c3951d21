"""torchrun script: let Composer wrap the DDSC model for FSDP2 exactly as training does (``build_parallelism``,
``composer.Trainer``), then report which modules became FSDP / checkpointed units, and one step's loss and
full gradients (rank 0 writes them with ``torch.save``); ``tests/test_precision.py`` asserts on them.

Usage: torchrun --nproc_per_node=2 tests/torchrun/composer_fsdp_wrap.py OUT.pt {ac|no-ac}
"""

from __future__ import annotations

import sys

import torch
from composer import Trainer
from composer.utils import dist, get_device, reproducibility
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FSDPModule

from ddsc.diffusion.config import DiffusionConfig
from ddsc.model.config import ModelConfig
from ddsc.model.dit import DiTBlock
from ddsc.train.builders import build_optimizer, build_parallelism
from ddsc.train.composer_model import DDSCComposerModel
from ddsc.train.config import OptimizerConfig, ParallelismConfig

K = 11


def main(out: str, checkpointing: bool) -> None:
    dist.initialize_dist(get_device("cpu"))
    reproducibility.seed_all(0)
    model = DDSCComposerModel(
        ModelConfig(d_model=32, n_layers=3, n_heads=2, gene_vocab_size=60, num_bins=K), DiffusionConfig()
    )
    for p in model.parameters():  # non-zero adaLN and head, so every gradient is non-trivial
        torch.nn.init.normal_(p, std=0.05)
    par = ParallelismConfig(strategy="fsdp", activation_checkpointing=checkpointing)
    trainer = Trainer(
        model=model,
        optimizers=build_optimizer(OptimizerConfig(), model, "cpu"),
        parallelism_config=build_parallelism(par, dist.get_world_size(), "cpu"),
        device="cpu",
        progress_bar=False,
    )
    dit = trainer.state.model.model
    blocks = list(dit.blocks)
    inner = [b._checkpoint_wrapped_module if isinstance(b, CheckpointWrapper) else b for b in blocks]

    g = torch.Generator().manual_seed(1 + dist.get_global_rank())
    batch = {
        "gene_ids": torch.randint(3, 60, (4, 17), generator=g),
        "expr": torch.randint(0, K, (4, 17), generator=g),
        "attention_mask": torch.ones(4, 17, dtype=torch.bool),
    }
    batch["attention_mask"][1, 10:] = False
    batch["real"] = batch["attention_mask"].clone()
    output = trainer.state.model(batch, generator=torch.Generator().manual_seed(5))
    output.loss.backward()
    grads = {
        name.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor().clone()
        for name, p in trainer.state.model.named_parameters()
    }
    loss = output.loss.detach().clone()
    torch.distributed.all_reduce(loss)
    report = {
        "blocks": len(blocks),
        "fsdp_blocks": sum(isinstance(b, DiTBlock) and isinstance(b, FSDPModule) for b in inner),
        "checkpointed_blocks": sum(isinstance(b, CheckpointWrapper) for b in blocks),
        "dit_is_fsdp": isinstance(dit, FSDPModule),
        "loss": loss / dist.get_world_size(),
        "grads": grads,
    }
    if dist.get_global_rank() == 0:
        torch.save(report, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "ac")
