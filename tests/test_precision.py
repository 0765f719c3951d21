"""The GPU precision paths, emulated on CPU: bf16 parameters (FSDP2 mixed precision, DeepSpeed bf16), Composer's
per-block FSDP units and activation checkpointing, and the precision each engine picks for each device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_model import random_batch, random_model
from test_train import tiny_config

from ddsc.config import ConfigError, load_config
from ddsc.diffusion.config import DiffusionConfig
from ddsc.diffusion.masked_diffusion import MaskedDiffusion
from ddsc.precision import BF16_MIN_SPEEDUP, autocast, cpu_bf16_speedup
from ddsc.train.builders import resolve_precision
from ddsc.train.config import RunConfig, TrainerConfig
from ddsc.train.deepspeed_engine import DeepSpeedPrecision, deepspeed_config, deepspeed_precision
from ddsc.train.run import settle_cpu_precision

ROOT = Path(__file__).resolve().parents[1]


def run_dist(script: str, nproc: int, port: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
    done = subprocess.run(
        [*cmd, str(ROOT / "tests" / "torchrun" / script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def test_dit_with_bf16_parameters_and_no_autocast_matches_fp32():
    """DeepSpeed's bf16 mode casts the module and runs it without autocast: the float32 islands must cope."""
    reference = random_model(time_conditioning=True).train()
    bf16 = random_model(time_conditioning=True).train().to(torch.bfloat16)
    gene_ids, expr, mask = random_batch(batch_size=4, length=12)
    batch = {"gene_ids": gene_ids, "expr": expr.clamp(max=5), "attention_mask": mask, "real": mask.clone()}
    batch["real"][:, 0] = False
    diffusion = MaskedDiffusion(DiffusionConfig(), 6)
    t = torch.tensor([0.3, 0.5, 0.7, 0.9])
    losses = {}
    for name, model in (("fp32", reference), ("bf16", bf16)):
        out = diffusion.loss(model, batch, t=t, generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        losses[name] = out.loss.item()
        assert out.logits.dtype == torch.float32
    assert abs(losses["bf16"] - losses["fp32"]) < 0.03 * losses["fp32"]
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in bf16.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_fsdp2_bf16_mixed_precision_matches_fp32(nproc, tmp_path):
    """Blocks and root under ``MixedPrecisionPolicy(bf16, reduce fp32)``: what crashed before the float32 islands
    handled bf16 weights (``mat1 and mat2 must have the same dtype``)."""
    out = tmp_path / "report.json"
    run_dist("fsdp_mixed_precision.py", nproc, 29760 + nproc, str(out))
    report = json.loads(out.read_text())
    assert report["world"] == nproc
    for mode in ("bf16_params", "bf16_params_autocast"):
        result = report[mode]
        assert abs(result["loss"] - report["fp32_loss"]) < 0.03 * report["fp32_loss"], result
        assert result["loss"] != report["fp32_loss"]  # bf16 really ran
        assert result["finite"] and result["grad_dtypes"] == ["torch.float32"]  # fp32 master gradients
        # The time embedding is the least precise: FSDP2 rounds its input t to bf16 (see ddsc.model.dit).
        assert result["min_grad_cosine"] > 0.95, result["worst"]


@pytest.mark.slow
def test_composer_fsdp2_wraps_each_block_and_checkpoints_each(tmp_path):
    reports = {}
    for mode in ("ac", "no-ac"):
        run_dist("composer_fsdp_wrap.py", 2, 29765, str(tmp_path / f"{mode}.pt"), mode)
        reports[mode] = torch.load(tmp_path / f"{mode}.pt", weights_only=True)
    for mode, report in reports.items():
        assert report["dit_is_fsdp"] and report["blocks"] == 3 and report["fsdp_blocks"] == 3, mode
    assert reports["ac"]["checkpointed_blocks"] == 3 and reports["no-ac"]["checkpointed_blocks"] == 0
    torch.testing.assert_close(reports["ac"]["loss"], reports["no-ac"]["loss"], rtol=0, atol=1e-6)
    with_ac, without = reports["ac"]["grads"], reports["no-ac"]["grads"]
    assert with_ac.keys() == without.keys() and len(with_ac) == 36
    assert sum(bool(g.abs().max() > 0) for g in with_ac.values()) >= 30  # (adaLN weights: no conditions, c = 0)
    for name, grad in with_ac.items():
        torch.testing.assert_close(grad, without[name], rtol=0, atol=1e-6, msg=name)


def test_cpu_precision_follows_the_measured_bf16_speed():
    speedup = cpu_bf16_speedup()
    assert 0.05 < speedup < 50  # two real timings of the same matmul
    auto = resolve_precision(TrainerConfig(precision="auto"), "cpu")
    assert auto == ("fp32", torch.bfloat16 if speedup >= BF16_MIN_SPEEDUP else None)
    assert resolve_precision(TrainerConfig(precision="amp_bf16"), "cpu") == ("fp32", torch.bfloat16)
    assert resolve_precision(TrainerConfig(precision="fp32"), "cpu") == ("fp32", None)
    with pytest.raises(ConfigError, match="amp_fp16 needs a GPU"):
        resolve_precision(TrainerConfig(precision="amp_fp16"), "cpu")


def test_cpu_auto_precision_is_decided_once_per_run():
    measured = "amp_bf16" if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "fp32"
    assert settle_cpu_precision(None) == measured  # a fresh run measures
    assert settle_cpu_precision({"trainer": {"precision": "auto"}}) == measured
    for saved in ("fp32", "amp_bf16"):  # a resumed run keeps its first launch's answer
        assert settle_cpu_precision({"trainer": {"precision": saved}}) == saved


def test_autocast_follows_the_data_device():
    assert autocast("cuda", torch.bfloat16).device == "cuda"  # constructible (and disabled) without CUDA
    assert autocast("cpu", torch.bfloat16).device == "cpu"
    with autocast("cpu", None):
        assert not torch.is_autocast_enabled("cpu")


def test_deepspeed_precision_and_config_for_a_gpu(tmp_path):
    from train_data import write_mds

    write_mds(tmp_path / "mds", n_train=8, n_valid=4)
    tiny = tiny_config(tmp_path)

    def precision(*overrides: str) -> DeepSpeedPrecision:
        config = load_config(RunConfig, tiny, ["parallelism.engine=deepspeed", *overrides])
        return deepspeed_precision(config, "gpu")

    # ZeRO 2-3: bf16 module with fp32 master weights; no autocast on top.
    for stage in (2, 3):
        assert precision("trainer.precision=amp_bf16", f"parallelism.zero_stage={stage}") == DeepSpeedPrecision(True)
    # Stages 0-1: fp32 weights with bf16 autocast, as Composer's DDP (exportable checkpoints).
    for stage in (0, 1):
        assert precision("trainer.precision=amp_bf16", f"parallelism.zero_stage={stage}") == DeepSpeedPrecision(
            autocast_dtype=torch.bfloat16
        )
    assert precision("trainer.precision=fp32") == DeepSpeedPrecision()
    with pytest.raises(ConfigError, match="not amp_fp16"):
        precision("trainer.precision=amp_fp16")
    config = load_config(RunConfig, tiny, ["parallelism.engine=deepspeed"])
    ds = deepspeed_config(config, world_size=2, precision=DeepSpeedPrecision(bf16_section=True))
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["communication_data_type"] == "fp32"
    assert "bf16" not in deepspeed_config(config, world_size=2, precision=DeepSpeedPrecision())


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check runs for real")
def test_gpu_check_without_a_gpu_exits_2_with_one_line():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False)"]
