"""What a Composer training run prints: the progress bar and one line of metrics per console interval.

Composer's ``ConsoleLogger`` prints every logged value on a line of its own, and a run logs many per batch
(time counters, per-parameter norms, wall clock): the demo's console was thousands of lines that buried the
loss. This logger prints, on rank 0, one line per ``trainer.console_log_interval`` and one per evaluation with
the values worth watching under short names: the loss, the diffusion metrics, the learning rate, the
throughput and MFU. Every value still reaches the other loggers (W&B, ``trainer.log_file``) under Composer's
names. Lines go through ``tqdm.write`` so they appear above the progress bar instead of breaking it.
"""

from __future__ import annotations

import re
import sys

from composer.core import State, Time, TimeUnit
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist
from tqdm.auto import tqdm

from ddsc.config import ConfigError

# Composer's metric name -> the printed name, in the order printed (nelbo, masked_ce, masked_acc, ...).
PRINTED: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"loss/train/total"), "loss"),
    (re.compile(r"metrics/(train|eval)/(\w+)"), r"\1/\2"),
    (re.compile(r"lr-\w+/group0"), "lr"),
    (re.compile(r"throughput/samples_per_sec"), "cells/s"),
    (re.compile(r"throughput/device/mfu"), "mfu"),
)


def printed_name(name: str) -> tuple[int, str] | None:
    """(place in ``PRINTED``, short name) of a metric that is printed, else None."""
    for place, (pattern, short) in enumerate(PRINTED):
        if pattern.fullmatch(name):
            return place, pattern.sub(short, name)
    return None


class MetricLines(LoggerDestination):
    """One console line of the ``PRINTED`` metrics every ``interval`` (``"10ba"`` or ``"1ep"``) and per evaluation."""

    def __init__(self, interval: str):
        self.interval = Time.from_timestring(interval)
        if self.interval.unit not in (TimeUnit.BATCH, TimeUnit.EPOCH):
            raise ConfigError(f"trainer.console_log_interval: batches or epochs (e.g. '10ba'), got {interval}")
        self.values: dict[str, float] = {}
        self.printed_at = -1

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.values.update({k: float(v) for k, v in metrics.items() if printed_name(k) is not None})

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.interval.unit == TimeUnit.BATCH and int(state.timestamp.batch) % self.interval.value == 0:
            self._print(state, train=True)

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self.interval.unit == TimeUnit.EPOCH and int(state.timestamp.epoch) % self.interval.value == 0:
            self._print(state, train=True)

    def eval_start(self, state: State, logger: Logger) -> None:
        self.values = {}  # the train values were printed at their interval (or are shown on the progress bar)

    def eval_end(self, state: State, logger: Logger) -> None:
        self._print(state, train=False)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.printed_at != int(state.timestamp.batch):
            self._print(state, train=True)

    def _print(self, state: State, train: bool) -> None:
        values, self.values = self.values, {}
        batch = int(state.timestamp.batch)
        if not values or dist.get_global_rank() != 0:
            return
        self.printed_at = batch if train else self.printed_at
        total = f"/{state.max_duration.value}" if state.max_duration.unit == TimeUnit.BATCH else ""
        where = f"[batch={batch}{total}]" if train else f"[eval at batch={batch}]"
        shown = sorted((printed_name(k), v) for k, v in values.items())
        line = " ".join(f"{name}={value:.4g}" for (_, name), value in shown)
        tqdm.write(f"{where} {line}", file=sys.stderr)
