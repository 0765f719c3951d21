"""The DiT + masked diffusion loss as a Composer ``ComposerModel`` (also driven by the DeepSpeed engine).

Composer owns the loop; this class says what a batch means: ``forward`` runs the diffusion loss (sample t,
mask, predict), ``loss`` returns its NELBO, and the four metrics of the design notes are updated from the
same ``DiffusionOutput`` sums. Evaluation draws t and masks from a generator seeded per batch, so successive
evaluations score the same noise and their differences are the model's, not the noise's.
"""

from __future__ import annotations

import contextlib

import torch
from composer.models import ComposerModel
from torchmetrics import Metric

from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.masked_diffusion import DiffusionOutput, MaskedDiffusion
from ddsc.model.config import ModelConfig
from ddsc.model.dit import DiT, DiTBlock
from ddsc.train.metrics import NELBO, MaskedAccuracy, MaskedAccuracyPM1, MaskedCE

EVAL_SEED = 1234

MODEL_INPUTS = ("gene_ids", "expr", "counts", "real", "attention_mask", "cond")


def _metrics() -> dict[str, Metric]:
    return {
        "nelbo": NELBO(),
        "masked_ce": MaskedCE(),
        "masked_acc": MaskedAccuracy(),
        "masked_acc_pm1": MaskedAccuracyPM1(),
    }


class DDSCComposerModel(ComposerModel):
    """``model`` is the DiT (exported as is); ``autocast_dtype`` enables bf16 autocast on CPU (see builders)."""

    def __init__(
        self, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, autocast_dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.model = DiT(model_cfg)
        self.diffusion = MaskedDiffusion(diffusion_cfg, model_cfg.num_bins)
        self.autocast_dtype = autocast_dtype
        # Plain dicts, not submodules: FSDP must not try to shard metric state (Composer moves metrics itself).
        self.train_metrics = _metrics()
        self.val_metrics = _metrics()
        self._eval_batches = 0

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.autocast_dtype)

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> DiffusionOutput:
        with self._autocast():
            return self.diffusion.loss(self.model, batch, generator=generator)

    def loss(self, outputs: DiffusionOutput, batch: dict) -> torch.Tensor:
        return outputs.loss

    def eval_forward(self, batch: dict, outputs: DiffusionOutput | None = None) -> DiffusionOutput:
        if outputs is not None:
            return outputs
        self._eval_batches += 1
        generator = torch.Generator(device=batch["gene_ids"].device).manual_seed(EVAL_SEED + self._eval_batches)
        return self(batch, generator=generator)

    def reset_eval_noise(self) -> None:
        """Called at the start of each evaluation: batch k of every evaluation gets the same t and mask."""
        self._eval_batches = 0

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return dict(self.train_metrics if is_train else self.val_metrics)

    def update_metric(self, batch: dict, outputs: DiffusionOutput, metric: Metric) -> None:
        metric.update(outputs)

    def flops_per_batch(self, batch: dict) -> float:
        """Training FLOPs (forward + backward) of one batch, for the speed monitor's MFU."""
        batch_size, length = batch["gene_ids"].shape
        return float(self.model.flops_per_token(length) * batch_size * length)

    def fsdp_wrap_fn(self, module: torch.nn.Module) -> bool:
        """Shard per transformer block (FSDP1 and FSDP2), so only one block's weights are gathered at once."""
        return isinstance(module, DiTBlock)

    def activation_checkpointing_fn(self, module: torch.nn.Module) -> bool:
        return isinstance(module, DiTBlock)
