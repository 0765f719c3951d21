"""A ``StreamingDataset`` whose shard failures stop the run at once and name the shard.

With Streaming alone, a shard with flipped bytes fails deep inside sample decoding (``UnicodeDecodeError``,
a numpy shape error) with no file named; a shard that fails its hash (``validate_hash``) or cannot be
decompressed in Streaming's background download thread only logs that thread's traceback and ends the
epoch early, silently, and the next epoch raises "Background thread failed". This subclass overrides
Streaming's public hooks (``prepare_shard``, ``get_item``, ``on_exception``, ``__iter__``) so that each of
these raises :class:`CorruptShardError` with the shard's path, in the process iterating the data.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import zstd
from streaming import StreamingDataset

from ddsc.errors import InputError

# What reading or decoding damaged shard bytes raises (a failed hash is Streaming's ValueError; a missing file
# is an OSError, which names the file itself).
SHARD_ERRORS = (ValueError, IndexError, KeyError, EOFError, OverflowError, struct.error, zstd.Error)


class CorruptShardError(InputError):
    """An MDS shard that fails its hash, does not decompress or does not decode; the message names it."""


class CheckedStreamingDataset(StreamingDataset):
    """``StreamingDataset`` raising :class:`CorruptShardError` (naming the shard) where Streaming fails vaguely."""

    _background_error: BaseException | None = None

    def shard_path(self, shard_id: int, compressed: bool) -> str:
        """The shard's file in its stream's local folder: the compressed one (if any) or the decompressed one."""
        shard = self.shards[shard_id]
        raw, zipped = shard.file_pairs[0]
        return os.path.join(shard.dirname, shard.split, (zipped if compressed and zipped else raw).basename)

    def _corrupt(self, path: str, what: str, err: BaseException) -> CorruptShardError:
        return CorruptShardError(
            f"{path}: corrupt MDS shard: {what} ({type(err).__name__}: {err}); "
            "`ddsc check-data` verifies every shard of a dataset"
        )

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except SHARD_ERRORS as err:  # the hash check or the decompression of a downloaded shard
            path = self.shard_path(shard_id, compressed=True)
            raise self._corrupt(path, "fails its hash or does not decompress", err) from err

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        if self._background_error is not None:
            raise self._background_error
        try:
            return super().get_item(sample_id, retry)
        except CorruptShardError:
            raise
        except SHARD_ERRORS as err:
            shard_id, index = self.spanner[sample_id]
            path = self.shard_path(int(shard_id), compressed=False)
            raise self._corrupt(path, f"sample {index} does not decode", err) from err

    def on_exception(self, future: Future) -> None:
        """Keep a background thread's error for the iterating thread (Streaming re-raises it in the callback,
        where it is only logged, and the epoch then ends early without an error)."""
        error = future.exception()
        if error is not None:
            self._background_error = error
            self._event.set()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from super().__iter__()
        if self._background_error is not None:
            raise self._background_error
