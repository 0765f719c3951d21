"""The DiT + masked diffusion loss as a Composer ``ComposerModel`` (also driven by the DeepSpeed engine).

Composer owns the loop; this class says what a batch means: ``forward`` runs the diffusion loss (sample t,
mask, predict), ``loss`` returns its NELBO, and the four metrics of the design notes are updated from the
same ``DiffusionOutput`` sums. Evaluation draws t and masks from a generator seeded per batch, so successive
evaluations score the same noise and their differences are the model's, not the noise's.
"""

from __future__ import annotations

import torch
from composer.models import ComposerModel
from torchmetrics import Metric

from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.masked_diffusion import DiffusionOutput, MaskedDiffusion
from ddsc.model.config import ModelConfig
from ddsc.model.dit import DiT
from ddsc.precision import autocast
from ddsc.train.metrics import NELBO, MaskedAccuracy, MaskedAccuracyPM1, MaskedCE

EVAL_SEED = 1234
METRICS = {
    "nelbo": NELBO,
    "masked_ce": MaskedCE,
    "masked_acc": MaskedAccuracy,
    "masked_acc_pm1": MaskedAccuracyPM1,
}


class SeededEvalModel(ComposerModel):
    """What every family's wrapper shares: autocast, the per-batch evaluation seed, the metric plumbing."""

    def __init__(self, autocast_dtype: torch.dtype | None, metrics: dict[str, type[Metric]]):
        super().__init__()
        self.autocast_dtype = autocast_dtype
        # Plain dicts, not submodules: FSDP must not try to shard metric state (Composer moves metrics itself).
        self.train_metrics = {name: cls() for name, cls in metrics.items()}
        self.val_metrics = {name: cls() for name, cls in metrics.items()}
        self._eval_batches = 0

    def loss(self, outputs, batch: dict) -> torch.Tensor:
        return outputs.loss

    def eval_forward(self, batch: dict, outputs=None):
        if outputs is not None:
            return outputs
        self._eval_batches += 1
        generator = torch.Generator(device=batch["gene_ids"].device).manual_seed(EVAL_SEED + self._eval_batches)
        return self(batch, generator=generator)

    def reset_eval_noise(self) -> None:
        """Called at the start of each evaluation: batch k of every evaluation gets the same noise."""
        self._eval_batches = 0

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return dict(self.train_metrics if is_train else self.val_metrics)

    def update_metric(self, batch: dict, outputs, metric: Metric) -> None:
        metric.update(outputs)


class DDSCComposerModel(SeededEvalModel):
    """``model`` is the DiT (exported as is; it also tells Composer how to shard and checkpoint it).

    ``autocast_dtype`` turns on autocast around the loss where the engine does not (Composer runs its own
    autocast on GPU, so there it is None; on CPU, and in the DeepSpeed engine, this wrapper does it), always
    for the device type of the batch.
    """

    def __init__(
        self, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig, autocast_dtype: torch.dtype | None = None
    ):
        super().__init__(autocast_dtype, METRICS)
        self.model = DiT(model_cfg)
        self.diffusion = MaskedDiffusion(diffusion_cfg, model_cfg.num_bins)

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> DiffusionOutput:
        with autocast(batch["gene_ids"].device.type, self.autocast_dtype):
            return self.diffusion.loss(self.model, batch, generator=generator)

    def flops_per_batch(self, batch: dict) -> float:
        """Training FLOPs (forward + backward) of one batch's real positions, for the speed monitor's MFU: the
        work padding costs (in the ``masked`` reference) is waste, not model FLOPs."""
        return self.model.flops(batch["attention_mask"])
