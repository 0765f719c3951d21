"""A bulk writer of Streaming MDS shards: one call encodes a whole batch of cells, byte-identical to MDSWriter.

Why not ``streaming.MDSWriter``: its ``write`` encodes one sample at a time in Python (a dict, a per-column
encoder look-up, numpy dtype checks), about 0.2 ms per 14-column cell, several times the cost of reading
the cell from parquet. Here a batch is encoded with one ``bytes.join`` over per-row pieces that are mostly
zero-copy views of the flat gene / count arrays, so the writer costs a few microseconds per cell plus the
compression of the bytes.

The files are the ones MDSWriter writes for the same samples (mosaicml-streaming 0.13,
``streaming/base/format/mds/{writer,encodings}.py``; tests/test_data_mds_shards.py checks byte equality):

* shard  = ``uint32 num_samples``, ``uint32 offsets[num_samples + 1]`` (from the file start), the writer's
  config as sorted-key JSON, then the samples;
* sample = the ``uint32`` byte size of every variable-size column, then every column's bytes, both in sorted
  column-name order;
* ``str`` = utf-8; ``ndarray:<dtype>`` (fixed dtype, dynamic shape) = one byte ``ndim << 2 | w`` with ``w``
  the width code of the smallest unsigned int holding the shape (0: uint8 ... 3: uint64), the shape in that
  type, then the raw values; ``ndarray`` (dynamic dtype and shape) = the same, led by one byte naming the
  values' dtype;
* a shard is cut before the sample that would take it past ``size_limit`` (counting 8 bytes + the config per
  shard and 4 bytes per sample), the same greedy rule as MDSWriter, empty-shard corner case included;
* compression through Streaming's own ``compress``; ``index.json`` is MDSWriter's, key for key, with the
  ``hashes`` (e.g. xxh64) of every raw and compressed shard file that MDSWriter records when asked, computed
  on the pieces as they are written (no copy): readers verify them (Streaming's ``validate_hash``,
  ``ddsc check-data``).

Compressing a shard is the largest single cost of a conversion (zstd level 1 on two threads takes 0.5-0.8x
the time pyarrow takes to read those cells, level 3 0.9-1.2x; benchmarks/data_prep.py), so it runs on a
background thread: zstd and the file write release the GIL and overlap with reading and encoding the next shard. One
shard at most is in flight, so memory stays bounded at about two shards. zstd shards are streamed through
``zstandard`` on the worker's share of the cores straight from the encoded batch buffers into the file: no 64 MB
shard copy (a fresh allocation per shard, whose page faults cost as much as the copy) and no compressed
copy in memory. zstd's multi-threaded format does not depend on the thread count, so the files are the
ones Streaming's own ``compress`` (python-zstd, also multi-threaded) writes; other codecs go through that
``compress``.

Only the encodings the DDSC schema uses are supported (``str``, ``ndarray`` and ``ndarray:<dtype>``, any
shape); others are refused at construction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import xxhash
import zstandard
from streaming.base.compression import compress, get_compression_extension, is_compression
from streaming.base.format.index import get_index_basename
from streaming.base.format.mds.encodings import NDArray
from streaming.base.hashing import is_hash

FORMAT = "mds"
SAMPLE_OVERHEAD = 4  # MDSWriter.extra_bytes_per_sample: the sample's offset in the shard header
ZSTD_DEFAULT_LEVEL = 3  # Streaming's level for "zstd"
_SHAPE_WIDTHS = (np.uint8, np.uint16, np.uint32, np.uint64)
ZSTD_ONE_SHOT_MAX = 512 << 10  # libzstd's ZSTDMT_JOBSIZE_MIN: smaller inputs are compressed on one thread


@dataclass(frozen=True)
class Ragged:
    """Rows of a flat array: row ``i`` is ``values[starts[i]:ends[i]]`` (no copy of the values needed)."""

    values: np.ndarray
    starts: np.ndarray
    ends: np.ndarray


@lru_cache(maxsize=1 << 16)
def _shape_header(length: int, dtype_code: bytes) -> bytes:
    """The ``ndarray`` prefix of a 1-D array of ``length`` values (lengths repeat, so they are cached);
    ``dtype_code`` leads it in a dynamic-dtype column (``b""`` in a fixed-dtype one)."""
    width = next(i for i, t in enumerate(_SHAPE_WIDTHS) if length <= np.iinfo(t).max)
    return dtype_code + bytes([1 << 2 | width]) + _SHAPE_WIDTHS[width](length).tobytes()


@lru_cache
def _dtype_code(dtype: np.dtype) -> bytes:
    """The byte that names ``dtype`` in a dynamic-dtype ``ndarray`` column: the first byte of Streaming's own
    encoding of such an array (ValueError for a dtype Streaming cannot store)."""
    try:
        return NDArray().encode(np.zeros(1, dtype))[:1]
    except (KeyError, ValueError):
        raise ValueError(f"{dtype} values cannot be stored in an MDS ndarray column") from None


def zstd_compressor(compression: str | None, threads: int) -> zstandard.ZstdCompressor | None:
    """A reusable compressor for ``"zstd"`` / ``"zstd:<level>"`` on ``threads`` threads of its own (any
    count >= 1 gives the same bytes); None for other codecs. Not thread-safe: one per writer thread."""
    codec, _, level = (compression or "").partition(":")
    if codec != "zstd":
        return None
    return zstandard.ZstdCompressor(level=int(level or ZSTD_DEFAULT_LEVEL), threads=max(1, threads))


def write_compressed(
    f: BinaryIO, pieces: list, size: int, compression: str, zstd: zstandard.ZstdCompressor | None
) -> None:
    """Compress the concatenation of ``pieces`` (``size`` bytes) into ``f`` as Streaming's ``compress`` would.

    zstd compresses an input of up to ``ZSTD_ONE_SHOT_MAX`` bytes on one thread whatever the thread count,
    and there a streamed frame of several blocks can differ from Streaming's one-shot frame (by an empty
    last block), so such shards are joined (a small copy) and go through ``compress`` too.
    """
    if zstd is None or size <= ZSTD_ONE_SHOT_MAX:
        f.write(compress(compression, b"".join(pieces)))
        return
    with zstd.stream_writer(f, size=size, closefd=False) as stream:
        for piece in pieces:
            stream.write(piece)


def _array_dtype(encoding: str) -> np.dtype | None:
    """``"ndarray:int32"`` -> int32; None for ``"ndarray"`` (dynamic dtype); ValueError for anything else."""
    kind, _, dtype = encoding.partition(":")
    if kind != "ndarray" or ":" in dtype:
        raise ValueError(f"MDSShardWriter encodes 'str', 'ndarray' and 'ndarray:<dtype>' columns, not {encoding!r}")
    return np.dtype(dtype) if dtype else None


def _encode_strings(column: Sequence[str]) -> tuple[list[list[bytes]], np.ndarray]:
    encoded = [s.encode("utf-8") for s in column]
    return [encoded], np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))


def _encode_arrays(name: str, column: Ragged, dtype: np.dtype | None) -> tuple[list[list], np.ndarray]:
    """Per row: the header and a zero-copy view of the row's values (``dtype`` None: the values' own)."""
    if dtype is not None and column.values.dtype != dtype:
        raise ValueError(f"column {name!r}: expected {dtype} values, got {column.values.dtype}")
    try:
        code = b"" if dtype is not None else _dtype_code(column.values.dtype)
    except ValueError as err:
        raise ValueError(f"column {name!r}: {err}") from None
    starts, ends = np.asarray(column.starts, dtype=np.int64), np.asarray(column.ends, dtype=np.int64)
    lengths = ends - starts
    if len(lengths) and lengths.min() <= 0:
        raise ValueError(f"column {name!r}: row {int(np.argmin(lengths))} is empty (MDS cannot encode it)")
    values = memoryview(np.ascontiguousarray(column.values)).cast("B")
    item = column.values.dtype.itemsize
    headers = [_shape_header(length, code) for length in lengths.tolist()]
    rows = [values[a:b] for a, b in zip((starts * item).tolist(), (ends * item).tolist(), strict=True)]
    header_sizes = np.fromiter(map(len, headers), dtype=np.int64, count=len(headers))
    return [headers, rows], header_sizes + lengths * item


class MDSShardWriter:
    """Write batches of samples into an MDS folder (``shard.NNNNN.mds[.zstd]`` + ``index.json``).

    ``columns`` maps names to encodings as for MDSWriter. ``write_batch`` takes, per column, a list of str
    or a :class:`Ragged` of 1-D arrays (each row non-empty, like MDSWriter's ndarray encoding requires).
    ``threads`` is how many threads zstd may use per shard (the bytes written do not depend on it).
    ``hashes``: Streaming hash algorithms (sorted, as MDSWriter requires) recorded per shard file in the index.
    ``finish`` flushes the last shard, waits for the background writes and writes the index; a writer that
    is not finished leaves no index. Use it as a context manager so an error stops its thread.
    """

    def __init__(
        self,
        out: str | Path,
        columns: Mapping[str, str],
        compression: str | None,
        size_limit: int | None,
        threads: int = 2,
        hashes: Sequence[str] = (),
    ) -> None:
        compression = compression or None
        if compression and not is_compression(compression):
            raise ValueError(f"invalid compression: {compression}")
        if list(hashes) != sorted(hashes) or not all(is_hash(algo) for algo in hashes):
            raise ValueError(f"hashes must be sorted names of Streaming's hash algorithms, got {list(hashes)}")
        self.hashes = list(hashes)
        size_limit = size_limit or None
        if size_limit is not None and not 0 < size_limit < 2**32:
            raise ValueError(f"size_limit must be in (0, 2**32): shard offsets are uint32, got {size_limit}")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.compression = compression
        self.size_limit = size_limit
        self._zstd = zstd_compressor(compression, threads)  # used on the background thread only
        if not columns:
            raise ValueError("no columns")
        self.names = sorted(columns)
        self.encodings = [columns[name] for name in self.names]
        self.dtypes = [None if e == "str" else _array_dtype(e) for e in self.encodings]
        self.config = {
            "version": 2,
            "format": FORMAT,
            "compression": compression,
            "hashes": self.hashes,
            "size_limit": size_limit,
            "column_names": self.names,
            "column_encodings": self.encodings,
            "column_sizes": [None] * len(self.names),  # both encodings are variable-size
        }
        self.config_data = json.dumps(self.config, sort_keys=True).encode("utf-8")
        self.shard_overhead = 8 + len(self.config_data)  # MDSWriter.extra_bytes_per_shard
        self.shards: list[dict] = []
        self._writes: list[Future] = []  # per shard, in order: its index entry once written
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mds-shard")
        self._pending: list[memoryview] = []  # encoded samples (byte ranges of batch buffers) of the open shard
        self._pending_sizes: list[np.ndarray] = []
        self._shard_bytes = self.shard_overhead

    def write_batch(self, columns: Mapping[str, Sequence[str] | Ragged]) -> None:
        data, sizes = self._encode(columns)
        ends = np.cumsum(sizes)
        starts = ends - sizes
        charged = sizes + SAMPLE_OVERHEAD
        first, n = 0, len(sizes)
        while first < n:
            room = np.inf if self.size_limit is None else self.size_limit - self._shard_bytes
            cum = np.cumsum(charged[first:])
            fits = int(np.searchsorted(cum, room, side="right"))
            if fits == n - first:
                self._add(data, starts, ends, first, n, int(cum[-1]))
                return
            self._add(data, starts, ends, first, first + fits, int(cum[fits - 1]) if fits else 0)
            self._flush()
            # MDSWriter appends the sample that did not fit to the new shard whatever its size.
            self._add(data, starts, ends, first + fits, first + fits + 1, int(charged[first + fits]))
            first += fits + 1

    def finish(self) -> None:
        if self._pending:
            self._flush()
        self.shards = [write.result() for write in self._writes]
        self._thread.shutdown()
        index = self.out / get_index_basename()
        with open(index, "w") as f:
            json.dump({"version": 2, "shards": self.shards}, f, sort_keys=True)

    def close(self) -> None:
        """Stop the background thread (waits for the shard in flight; queued ones are not written)."""
        self._thread.shutdown(cancel_futures=True)

    def __enter__(self) -> MDSShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _encode(self, columns: Mapping[str, Sequence[str] | Ragged]) -> tuple[memoryview, np.ndarray]:
        """The batch's samples back to back in one buffer, and each sample's size in bytes."""
        missing = set(self.names) - set(columns)
        if missing:
            raise KeyError(f"batch lacks column(s) {sorted(missing)}")
        pieces_per_column: list[list] = []  # per column, one list (str) or two (ndarray header, values)
        sizes = []
        for name, encoding, dtype in zip(self.names, self.encodings, self.dtypes, strict=True):
            pieces, column_sizes = (
                _encode_strings(columns[name]) if encoding == "str" else _encode_arrays(name, columns[name], dtype)
            )
            pieces_per_column += pieces
            sizes.append(column_sizes)
        n = len(sizes[0])
        if any(len(s) != n for s in sizes):
            rows = {name: len(s) for name, s in zip(self.names, sizes, strict=True)}
            raise ValueError(f"batch columns have different numbers of rows: {rows}")
        size_table = np.stack(sizes, axis=1)
        head_size = 4 * len(self.names)
        heads = memoryview(size_table.astype(np.uint32).tobytes())
        step = len(pieces_per_column) + 1
        interleaved: list = [None] * (n * step)
        interleaved[0::step] = [heads[i : i + head_size] for i in range(0, n * head_size, head_size)]
        for k, pieces in enumerate(pieces_per_column, start=1):
            interleaved[k::step] = pieces
        return memoryview(b"".join(interleaved)), size_table.sum(axis=1) + head_size

    def _add(self, data: memoryview, starts: np.ndarray, ends: np.ndarray, lo: int, hi: int, charged: int) -> None:
        if hi > lo:
            self._pending.append(data[int(starts[lo]) : int(ends[hi - 1])])
            self._pending_sizes.append(ends[lo:hi] - starts[lo:hi])
        self._shard_bytes += charged

    def _flush(self) -> None:
        """Hand the open shard to the background thread (MDSWriter.flush_shard: encode, compress, write)."""
        sizes = np.concatenate(self._pending_sizes) if self._pending_sizes else np.zeros(0, np.int64)
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        offsets += 4 + 4 * len(offsets) + len(self.config_data)
        header = np.uint32(len(sizes)).tobytes() + offsets.astype(np.uint32).tobytes()
        if self._writes:  # back-pressure: the previous shard must be written before this one is queued
            self._writes[-1].result()
        pieces = [header, self.config_data, *self._pending]
        self._writes.append(self._thread.submit(self._write_shard, pieces, len(sizes), len(self._writes)))
        self._pending, self._pending_sizes = [], []
        self._shard_bytes = self.shard_overhead

    def _write_shard(self, pieces: list, samples: int, number: int) -> dict:
        """Compress and write one shard (on the background thread); returns its index entry."""
        size = sum(map(len, pieces))
        raw_name = f"shard.{number:05}.{FORMAT}"
        raw_info = {"basename": raw_name, "bytes": size, "hashes": _digests(self.hashes, pieces)}
        if not self.compression:
            with open(self.out / raw_name, "wb") as f:
                f.writelines(pieces)
            return {"samples": samples, "raw_data": raw_info, "zip_data": None, **self.config}
        zip_name = f"{raw_name}.{get_compression_extension(self.compression)}"
        with open(self.out / zip_name, "wb") as f:
            hashed = _HashingFile(f, self.hashes)
            write_compressed(hashed, pieces, size, self.compression, self._zstd)
            zip_info = {"basename": zip_name, "bytes": f.tell(), "hashes": hashed.digests()}
        return {"samples": samples, "raw_data": raw_info, "zip_data": zip_info, **self.config}


def _hasher(algo: str):
    """An incremental hasher giving the digest Streaming's ``get_hash(algo, data)`` gives for the whole data."""
    return getattr(xxhash, algo)() if algo in xxhash.algorithms_available else hashlib.new(algo)


def _digests(hashes: Sequence[str], pieces: Sequence) -> dict[str, str]:
    """``{algo: hex digest}`` of the concatenated ``pieces`` (no copy of them)."""
    digests = {}
    for algo in hashes:
        hasher = _hasher(algo)
        for piece in pieces:
            hasher.update(piece)
        digests[algo] = hasher.hexdigest()
    return digests


class _HashingFile:
    """A binary file that also hashes what is written to it (the compressed shard, streamed: never in memory)."""

    def __init__(self, f: BinaryIO, hashes: Sequence[str]):
        self.f = f
        self.hashers = {algo: _hasher(algo) for algo in hashes}

    def write(self, data) -> int:
        for hasher in self.hashers.values():
            hasher.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def digests(self) -> dict[str, str]:
        return {algo: hasher.hexdigest() for algo, hasher in self.hashers.items()}
