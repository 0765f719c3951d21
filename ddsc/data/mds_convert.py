"""The conversion engine shared by every converter: cells -> MDS splits, parallel, resumable, atomic.

Layout written under ``out``::

    train/index.json            merged index over the per-input folders (what StreamingDataset reads)
    train/<input>/              one MDS folder per input file (index.json + zstd shards)
    valid/... test/...          same, for the other splits (a split without cells has no folder)
    vocab.json labels.json summary.json
    .parts/<input>.json         done-marker: the input's statistics; .parts/config.json: the run's settings

Each input is converted by one worker process into ``<split>/<input>.tmp`` folders, renamed into place and
then marked done. The marker is the commit point: a killed run leaves no marker, so the re-run deletes that
input's leftovers and converts it again, and skips every marked input. Merged indexes, labels and the
summary are written last, only once every input is done, so no partial shard is ever indexed; a re-run that
finds every input done and the summary written has nothing to do. Each input's
output depends only on that input and the settings (splits come from a hash), so a resumed run equals an
uninterrupted one, and so does a run with another number of workers.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from ddsc.data.cells import CellBatch
from ddsc.data.conversion_stats import PartStats, format_summary, merge_labels, summarize
from ddsc.data.mds_shards import MDSShardWriter, Ragged
from ddsc.data.schema import LABELS_FILE, MDS_COLUMNS, METADATA_COLUMNS, SUMMARY_FILE, VOCAB_FILE
from ddsc.data.splits import SPLITS, SplitSpec, assign_splits
from ddsc.data.vocab import GeneVocab
from ddsc.errors import InputError

PARTS_DIR = ".parts"
INDEX_FILE = "index.json"
READ_AHEAD = 2  # batches a worker reads and validates ahead of the one it encodes
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
T = TypeVar("T")


class CellSource(Protocol):
    """A reader of one input file into validated cell batches; must be picklable (sent to workers)."""

    suffix: str

    def count_cells(self, path: str) -> int: ...

    def batches(self, path: str) -> Iterator[CellBatch]: ...


@dataclass(frozen=True)
class WriteOptions:
    split: SplitSpec = SplitSpec()
    # zstd level 1, not Streaming's level 3: compression bounds a worker, and level 1 runs 1.4-1.8x faster for
    # shards 7% (mouse10k) to 21% (synthetic) larger (benchmarks/data_prep.py). Readers decompress either;
    # "zstd" (level 3) is one option away.
    compression: str = "zstd:1"
    shard_size: int = 1 << 26  # bytes of uncompressed samples per shard (Streaming's default, 64 MiB)
    workers: int = 1
    # Per-file hashes in the index (Streaming's ``hashes``) so readers can verify every shard. xxh64 of a 64 MB
    # shard and of its zstd output costs about 1% of compressing it at level 1 (measured on demo shards).
    hashes: tuple[str, ...] = ("xxh64",)


class ConversionError(InputError):
    """An input could not be converted; the message names the input. Finished inputs stay done."""


def part_name(path: str, suffix: str) -> str:
    return os.path.basename(path.rstrip("/")).removesuffix(suffix) or "input"


def _atomic_write_json(path: Path, payload: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _columns(batch: CellBatch, rows: np.ndarray) -> dict[str, list[str] | Ragged]:
    """The MDS columns of the batch's cells ``rows`` (gene / count rows are views, not copies)."""
    starts, ends = (bound[rows] for bound in batch.bounds())
    take = rows.tolist()
    columns: dict[str, list[str] | Ragged] = {
        "cell_id": [batch.cell_ids[i] for i in take],
        "genes": Ragged(batch.genes, starts, ends),
        "counts": Ragged(batch.counts, starts, ends),
    }
    for col in METADATA_COLUMNS:
        values = batch.metadata[col]
        columns[col] = [values[i] for i in take]
    return columns


def read_ahead(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items``, produced up to ``depth`` ahead on a background thread.

    A worker's reading (parquet decoding) and validation (numpy) run mostly without the GIL, so producing
    the next batches on their own thread overlaps them with encoding the current one on the main thread
    (and with compression on the writer's thread). An error in ``items`` is raised at the item it replaces.
    """
    end = object()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        ahead = deque(pool.submit(next, items, end) for _ in range(depth))
        try:
            while (item := ahead.popleft().result()) is not end:
                ahead.append(pool.submit(next, items, end))
                yield item
        finally:
            for future in ahead:
                future.cancel()
            pool.shutdown()  # no thread is inside the generator after this
            close = getattr(items, "close", None)
            if close is not None:
                close()


def keep_freed_memory() -> None:
    """Make glibc keep freed blocks of up to 32 MiB for reuse instead of returning them to the OS.

    A worker allocates and frees arrays of 8-16 MB per batch. By default glibc unmaps or trims such blocks,
    and the kernel then faults the next ones back in page by page, zeroed: measured, that was about a fifth of
    a worker's CPU. The same blocks are live at once either way, so the peak RSS is unchanged; memory freed
    at the end stays with the process. A no-op where the C library has no ``mallopt`` (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


# Progress reporting from convert_part: the bar's update in-process, a queue's put in a worker process.
# A negative number announces an input's cell count (grows the bar's total) so no serial pre-pass is needed.
def _ignore(n: int) -> None:
    """Default progress sink (no bar)."""


_report: Callable[[int], None] = _ignore


def _init_worker(queue: mp.Queue) -> None:
    global _report
    _report = queue.put


def worker_threads(workers: int) -> int:
    """Threads per worker process (parquet decoding, zstd): its share of the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, workers))


def convert_part(source: CellSource, path: str, out: Path, options: WriteOptions, threads: int = 1) -> PartStats:
    """Convert one input into ``<split>/<name>`` folders and write its done-marker (runs in a worker).

    The worker reads and validates on one thread, encodes on this one and compresses on a third; parquet
    decoding and zstd each use up to ``threads`` threads.
    """
    name = part_name(path, source.suffix)
    keep_freed_memory()
    pa.set_cpu_count(threads)
    for split in SPLITS:  # leftovers of a killed run
        for leftover in (out / split / name, out / split / f"{name}.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
    stats = PartStats(input=path)
    writers: dict[int, MDSShardWriter] = {}
    try:
        with ExitStack() as stack:  # stops the writers' background threads on any error
            _report(-source.count_cells(path))
            for batch in read_ahead(source.batches(path), READ_AHEAD):
                split = assign_splits(batch, options.split)
                stats.add(batch, split)
                for s in np.unique(split).tolist():
                    if s not in writers:
                        tmp = out / SPLITS[s] / f"{name}.tmp"
                        writer = MDSShardWriter(
                            tmp, MDS_COLUMNS, options.compression, options.shard_size, threads, options.hashes
                        )
                        writers[s] = stack.enter_context(writer)
                    writers[s].write_batch(_columns(batch, np.flatnonzero(split == s)))
                _report(batch.cells_in)
            for writer in writers.values():
                writer.finish()
    except Exception as err:
        raise ConversionError(f"{path}: {err}") from err
    for s in sorted(writers):
        tmp, final = out / SPLITS[s] / f"{name}.tmp", out / SPLITS[s] / name
        stats.bytes_written += sum(f.stat().st_size for f in tmp.iterdir())
        os.replace(tmp, final)
    _atomic_write_json(out / PARTS_DIR / f"{name}.json", stats.to_dict())
    return stats


def merge_split_index(split_dir: Path, names: list[str]) -> int:
    """Write ``split_dir/index.json`` over the per-input folders (Streaming's merged-index format)."""
    shards = []
    for name in names:
        index_path = split_dir / name / INDEX_FILE
        if not index_path.exists():
            continue
        for shard in json.loads(index_path.read_text())["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{name}/{shard[key]['basename']}"
            shards.append(shard)
    _atomic_write_json(split_dir / INDEX_FILE, {"shards": shards, "version": 2})
    return sum(s["samples"] for s in shards)


def _settings(inputs: list[str], source_fingerprint: str, options: WriteOptions) -> dict:
    return {
        "inputs": inputs,
        "source": source_fingerprint,
        "split": asdict(options.split),
        "compression": options.compression,
        "shard_size": options.shard_size,
        "hashes": list(options.hashes),
    }


def _check_settings(out: Path, settings: dict) -> None:
    """A resumed run must use the settings of the run it resumes, or the result would mix two datasets."""
    path = out / PARTS_DIR / "config.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise ConversionError(
                f"{out} holds a conversion with different settings ({', '.join(changed)}): "
                "re-run with the same arguments to resume, or use a new --out"
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(path, settings)


def fingerprint(*parts: object) -> str:
    """A short stable hash of the reader's settings (vocab, dose table, ...) for the resume check."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:16]


def convert(
    inputs: list[str],
    source: CellSource,
    source_fingerprint: str,
    vocab: GeneVocab,
    out: str | Path,
    options: WriteOptions,
    extra: dict | None = None,
) -> dict:
    """Convert ``inputs`` into MDS splits under ``out``; resumes a killed run; returns the summary dict."""
    out = Path(out)
    if not inputs:
        raise ConversionError("no input files found")
    names = [part_name(p, source.suffix) for p in inputs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConversionError(f"input files must have distinct names (each becomes a folder); repeated: {dup}")
    _check_settings(out, _settings(inputs, source_fingerprint, options))
    start = time.perf_counter()
    done = {n: PartStats(**json.loads(p.read_text())) for n in names if (p := out / PARTS_DIR / f"{n}.json").exists()}
    pending = [p for p, n in zip(inputs, names, strict=True) if n not in done]
    if not pending and (out / SUMMARY_FILE).is_file():  # written last: the conversion is complete
        summary = json.loads((out / SUMMARY_FILE).read_text())
        cells = sum(summary["cells_per_split"].values())
        print(f"{out}: already converted ({cells:,} cells from {len(inputs)} input(s)); nothing to do")
        return summary
    resumed = len(done)
    with tqdm(total=0, unit="cell", desc=f"converting {len(pending)} file(s)", dynamic_ncols=True) as bar:
        for stats in _run(pending, source, out, options, bar):
            done[part_name(stats.input, source.suffix)] = stats
    parts = [done[n] for n in names]
    for split in SPLITS:
        if (out / split).is_dir():
            merge_split_index(out / split, names)
    vocab.to_json(out / VOCAB_FILE)
    _atomic_write_json(out / LABELS_FILE, merge_labels(parts))
    summary = summarize(
        parts, time.perf_counter() - start, inputs_resumed=resumed, split=asdict(options.split), **(extra or {})
    )
    _atomic_write_json(out / SUMMARY_FILE, summary)
    print(format_summary(summary))
    expected = ["train"] + (["valid"] if options.split.valid_fraction > 0 else [])
    for split in expected:
        if not summary["cells_per_split"].get(split):
            print(f"warning: split {split!r} has no cells")
    return summary


def _run(pending: list[str], source: CellSource, out: Path, options: WriteOptions, bar: tqdm) -> Iterator[PartStats]:
    """Convert pending inputs in-process (1 worker) or in a process pool, feeding the progress bar."""

    def update(n: int) -> None:
        if n < 0:
            bar.total += -n
            bar.refresh()
        else:
            bar.update(n)

    global _report
    workers = min(options.workers, len(pending))
    threads = worker_threads(workers)
    if workers <= 1:
        _report = update
        try:
            for path in pending:
                yield convert_part(source, path, out, options, threads)
        finally:
            _report = _ignore
        return
    # fork where the platform has it: workers inherit the imported modules (torch via streaming) instead of
    # re-importing them; safe here as the parent has run no torch op and holds no lock the workers need.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,)) as pool:
        futures: set[Future] = {pool.submit(convert_part, source, p, out, options, threads) for p in pending}
        try:
            while futures:
                finished, futures = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                while not queue.empty():
                    update(queue.get())
                for future in finished:
                    yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
