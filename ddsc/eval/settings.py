"""Evaluation settings (a light module: the CLI imports it without torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ddsc.eval.masks import MASK_RATES


@dataclass
class SamplerSettings:
    """How generated cells are drawn (see ``ddsc.diffusion.samplers.sample``)."""

    method: str = "first_hitting"
    steps: int = 32
    temperature: float = 1.0
    guidance_scale: float = 1.0
    batch_size: int = 64
    seed: int = 0


@dataclass
class EvalSettings:
    mask_rates: tuple[float, ...] = MASK_RATES
    seed: int = 0
    batch_size: int = 64
    knn_k: int = 10
    smoothing: float = 1.0  # pseudo-counts of the baselines' back-off distributions
    nelbo_points: int = 10  # 0 skips the NELBO grid
    generate_cells: int = 256  # per half; 0 skips generation and perturbation
    max_genes: int = 1000  # genes in the dense vectors of the generation metrics
    top_k: int = 50
    min_group_cells: int = 3
    control: str = "DMSO_TF"
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    device: str = "cpu"
    ground_truth: str | None = None  # demo ground_truth/ folder: score generated drug effects against it
    truth_control_cells: int = 16  # control cells per cell line whose panels are scored (expected values)
    truth_sampled_cells: int = 4  # of these, cells per line whose panels are also sampled (0: no sampling)
    truth_min_obs: int = 3  # panels a gene must appear in to enter the ground-truth correlation
    embed_labels: tuple[str, ...] = ()  # label columns scoring the embeddings (default: cell line, drug, dose)
