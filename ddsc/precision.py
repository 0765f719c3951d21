"""Numeric precision per device: which autocast dtype is worth it here, and the GPU's TF32 setting.

On GPU, bf16 is always the fast choice. On CPU it depends on the processor: with AMX a bf16 matmul is several
times faster than float32; with AVX-512 BF16 but no AMX it was measured 2x *slower* (162 vs 327 GFLOP/s on a
2-core development machine). So ``precision: auto`` on CPU measures once per process (about 0.2 s) instead of
assuming, and in a distributed run every rank takes rank 0's answer: ranks that disagreed would train on
different numerics.
"""

from __future__ import annotations

import functools
import time
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as tdist

# Shapes of one DiT matmul at the demo's size (positions x d_model x 4 d_model): the size that matters on CPU.
_PROBE_SHAPE = (1024, 256, 1024)
BF16_MIN_SPEEDUP = 1.1  # bf16 must be clearly faster: it also costs casts and precision


def _matmul_seconds(dtype: torch.dtype, repeats: int) -> float:
    m, k, n = _PROBE_SHAPE
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.mm(a, b)  # warm-up (kernel selection, packing buffers)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def cpu_bf16_speedup(repeats: int = 5) -> float:
    """fp32 / bf16 time of the same CPU matmul (>1: bf16 is faster), best of ``repeats``, measured once."""
    fp32, bf16 = _matmul_seconds(torch.float32, repeats), _matmul_seconds(torch.bfloat16, repeats)
    return fp32 / bf16


def cpu_prefers_bf16() -> bool:
    """Whether bf16 autocast pays on this CPU; the same answer on every rank of a process group."""
    choice = [cpu_bf16_speedup() >= BF16_MIN_SPEEDUP]
    if tdist.is_available() and tdist.is_initialized():
        tdist.broadcast_object_list(choice, src=0)
    return bool(choice[0])


def cpu_auto_precision(previous: str | None = None) -> tuple[str, str]:
    """(``precision: auto`` on CPU as "amp_bf16" or "fp32", why). ``previous``: the choice a run already made.

    A run decides once, at its first launch, and keeps the answer (the trainer saves it in the run's config):
    the probe is a timing, so a busy machine can answer differently, and a run resumed elsewhere or under load
    must not change its numerics halfway.
    """
    if previous in ("fp32", "amp_bf16"):
        return previous, "kept from the run's first launch"
    choice = "amp_bf16" if cpu_prefers_bf16() else "fp32"
    return choice, f"bf16 matmuls measured {cpu_bf16_speedup():.2f}x the speed of fp32 on this CPU"


def concrete_precision(want: str, device: str) -> str:
    """``trainer.precision`` with ``auto`` replaced, for either engine on ``device`` ("cpu" or "gpu"): bf16 where
    the GPU has it (else fp16), on CPU the measured choice. A run settles CPU ``auto`` once before either engine
    starts (``ddsc.train.run.check_run``), so the measurement here serves only callers that skip that step."""
    if want != "auto":
        return want
    if device == "gpu":
        return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"
    return cpu_auto_precision()[0]


def autocast(device_type: str, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast to ``dtype`` on ``device_type``, the type of the data's device (never a literal); None: off."""
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def enable_tf32() -> None:
    """TF32 for float32 matmuls and convolutions on Ampere+ GPUs, as Composer's GPU device sets it."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
