"""How every entry point ends on a problem with its input: one line ``error: <message>``, a non-zero exit.

A wrong config key, a missing or malformed file, a corrupt shard or checkpoint, non-integer counts: the user
can fix these, and a traceback only hides the one line that says what to fix. So such problems are raised as
exceptions whose message names the file, key, shard or cell, and the entry points (``ddsc``,
``launch/train.py``, the data_prep scripts) run through :func:`run_reporting_errors`, which prints that
message as one line. ``DDSC_DEBUG=1`` re-raises instead, for the traceback. Anything else (a bug) still
raises with its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

DEBUG_ENV = "DDSC_DEBUG"


class InputError(Exception):
    """A problem with what the user gave (config, file, dataset, checkpoint); the message names it."""


class ConfigError(InputError, ValueError):
    """A configuration problem; the message names the offending key.

    Defined here rather than in ``ddsc.config`` (which re-exports it) because config classes that ship inside an
    export folder (``ddsc.latent.config``) raise it, and this module needs nothing beyond the standard library,
    while ``ddsc.config`` needs omegaconf.
    """


# Problems with the input: ours, and the builtin ones that readers raise for a missing / unreadable file
# (OSError), a bad value (ValueError) or a missing name (KeyError).
INPUT_ERRORS: tuple[type[BaseException], ...] = (InputError, OSError, ValueError, KeyError)
# torch.utils.data re-raises a DataLoader worker's exception with the worker's traceback as its message.
_WORKER_TRACEBACK = "Original Traceback"


def one_line(err: BaseException) -> str:
    """The exception's message on one line (a worker's traceback reduced to the message it ended with)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if _WORKER_TRACEBACK in text and lines:
        name, _, message = lines[-1].partition(": ")  # "package.module.ErrorType: message"
        return message or name
    return " ".join(lines)


def run_reporting_errors(main: Callable[[], int | None], prefix: str = "error", status: int = 1) -> int:
    """``main()``'s exit status; on an input error, print ``<prefix>: <message>`` to stderr and return ``status``."""
    try:
        return int(main() or 0)
    except INPUT_ERRORS as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"{prefix}: {one_line(err)}", file=sys.stderr, flush=True)
        return status
