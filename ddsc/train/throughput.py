"""Real and padded token rates: what the model computed on, and what the batches held.

Composer's ``SpeedMonitor`` reports samples/s and MFU (from ``flops_per_batch``, which counts real positions
only); these rates add the token view, so the waste padding costs (or the saving of the unpadded attention
path) is visible in the logs: ``throughput/device/real_tokens_per_sec`` counts the ``attention_mask`` of each
batch, ``throughput/device/padded_tokens_per_sec`` every position of its ``[B, L]`` layout.
"""

from __future__ import annotations

import time
from collections import deque

import torch
from composer.core import Callback, State
from composer.loggers import Logger


class RateWindow:
    """Per-second rates of per-batch counts over the last ``size`` batches (wall clock between batch ends)."""

    def __init__(self, size: int):
        self.entries: deque[tuple[float, dict[str, float]]] = deque(maxlen=size + 1)

    def add(self, now: float | None = None, **counts: float) -> dict[str, float]:
        """Record one batch ending at ``now`` (seconds; the wall clock if None); the rates of the window ending
        here, or {} until the window is full."""
        self.entries.append((time.perf_counter() if now is None else now, counts))
        if len(self.entries) < self.entries.maxlen:  # type: ignore[operator]
            return {}
        elapsed = self.entries[-1][0] - self.entries[0][0]
        window = list(self.entries)[1:]
        return {key: sum(c[key] for _, c in window) / elapsed for key in counts}


def token_counts(attention_mask: torch.Tensor) -> dict[str, float]:
    return {"real_tokens": float(attention_mask.sum()), "padded_tokens": float(attention_mask.numel())}


class TokenRates(Callback):
    """Log this rank's real and padded tokens per second at every batch (Composer engine).

    The window is timed by the trainer's own clock (``state.timestamp.total_wct``), the one ``SpeedMonitor``
    times its samples/s with, so tokens/s divided by samples/s is exactly tokens per cell of the same batches.
    """

    def __init__(self, window_size: int):
        self.window = RateWindow(window_size)

    def batch_end(self, state: State, logger: Logger) -> None:
        now = state.timestamp.total_wct.total_seconds()
        rates = self.window.add(now, **token_counts(state.batch["attention_mask"]))
        if rates:
            logger.log_metrics({f"throughput/device/{k}_per_sec": v for k, v in rates.items()})
