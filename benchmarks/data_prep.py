"""Tahoe -> MDS conversion throughput and memory, as ratios against references measured in the same run.

On a generated Tahoe-format shard of realistic size (default 28k cells x ~2,000 non-zero genes):
  1. per-worker conversion rate / plain single-threaded pyarrow read rate of the same file (target >= 0.5),
     with the default shard compression (zstd level 1);
  2. 1 -> 2 worker scaling on two such files (ideal 2.0; limited by the machine's free cores: one worker
     already uses every core it is given, see below);
  3. peak RSS of a worker process converting 1x and `--scale`x as many cells in one file (target < 1.5 GB,
     flat), against the RSS of a process that only imports the converter, and the `--scale`x file's
     conversion rate against the read (start-up and the last shard's compression amortised);
  4. the same 1-worker ratio for each of `--compressions` (zstd = level 3, Streaming's default, and none),
     and for each zstd level the rate of the codec alone re-compressing the raw shards the 1-worker run
     wrote (the converter's own compressor and threads: the codec's own bound on the ratio of item 1) and
     the compression ratio it reaches (raw / compressed bytes).
A worker reads and validates on one thread, encodes on another and compresses on a third, and parquet
decoding and zstd each get the worker's share of the cores (all of them for one worker); the CPU-time ratio
(all threads) shows the cost per core. Each measurement runs in a fresh process; peak RSS is that process's
VmHWM, and its CPU seconds are reported beside the wall time (the target is on wall time). The plain read
is single-threaded (use_threads=False). Read and conversion alternate `--pairs` times; each pair gives one
ratio, and the median pair is reported with the range over all pairs (in fresh processes the read alone
varies by up to 1.8x here, so a single pair decides little). Dirty pages are flushed before each
measurement (untimed), and the `--scale`x input is written only after the 1x runs. The load average is
printed: on a shared machine every rate drops, the ratios much less.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ddsc.data.mds_convert import WriteOptions

DEFAULT_COMPRESSION = WriteOptions.compression

CHILD = r"""
import json, sys, time
import pyarrow.parquet as pq
mode, out, inputs, genes, compression = sys.argv[1:6]
extra = {}
import pyarrow.dataset  # imported lazily by the vocab reader: a one-time import, like the ones above, not conversion
from ddsc.data.mds_convert import WriteOptions
from ddsc.data.splits import SplitSpec
from ddsc.data.tahoe import convert_tahoe
start, cpu = time.perf_counter(), time.process_time()
if mode == "read":
    cells = sum(b.num_rows for b in pq.ParquetFile(inputs).iter_batches(batch_size=1024, use_threads=False))
elif mode == "compress":  # the codec alone: re-compress the shards a conversion wrote (decompressed untimed)
    import json as js, pathlib
    from streaming.base.compression import decompress
    from ddsc.data.mds_convert import worker_threads
    from ddsc.data.mds_shards import write_compressed, zstd_compressor
    class Count:  # a sink that keeps only the number of bytes written
        written = 0
        def write(self, data): self.written += len(data); return len(data)
        def flush(self): pass
    shards = [s for s in js.loads((pathlib.Path(out) / "index.json").read_text())["shards"] if s["zip_data"]]
    raws = [decompress(s["compression"], (pathlib.Path(out) / s["zip_data"]["basename"]).read_bytes()) for s in shards]
    cells = sum(s["samples"] for s in shards)
    zstd, sink = zstd_compressor(compression, worker_threads(1)), Count()
    start, cpu = time.perf_counter(), time.process_time()
    for raw in raws:
        write_compressed(sink, [raw], len(raw), compression, zstd)
    extra = {"size_ratio": sum(map(len, raws)) / sink.written}
elif mode != "import":
    options = WriteOptions(split=SplitSpec(valid_fraction=0.01), workers=int(mode), compression=compression)
    cells = convert_tahoe(inputs, genes, out, options=options)["cells_out"]
else:
    cells = 0
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))  # peak RSS, kB
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "cells": cells, "peak_rss_mb": hwm / 1024, **extra}))
"""


def run_child(mode: str, out: Path, inputs: Path, genes: Path, compression: str = DEFAULT_COMPRESSION) -> dict:
    """Run one measurement in a fresh process; returns its timing and that process's peak RSS (VmHWM).

    Dirty pages are flushed first (untimed): the kernel otherwise writes back the inputs and the previous
    run's shards (gigabytes on the 10x input) in the middle of the next measurement.
    """
    os.sync()
    command = [sys.executable, "-c", CHILD, mode, str(out), str(inputs), str(genes), compression.replace("none", "")]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child {mode} failed:\n{result.stderr[-2000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"  {mode:>8} {inputs.name}: {measured['seconds']:.2f} s, {measured['cpu_seconds']:.2f} s CPU", flush=True)
    return measured


def repeat_rows(src: Path, dst: Path, times: int) -> None:
    """``dst`` = ``src``'s rows ``times`` over, copied row group by row group (bounded memory, fast)."""
    import pyarrow.parquet as pq

    source = pq.ParquetFile(src)
    with pq.ParquetWriter(dst, source.schema_arrow) as writer:
        for _ in range(times):
            for i in range(source.num_row_groups):
                writer.write_table(source.read_row_group(i))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=28000, help="cells per 1x shard (default %(default)s)")
    parser.add_argument(
        "--genes-per-cell", type=int, default=2000, help="non-zero genes per cell (default %(default)s)"
    )
    parser.add_argument(
        "--scale", type=int, default=10, help="cells of the large input / cells per shard (default %(default)s)"
    )
    parser.add_argument(
        "--pairs", type=int, default=5, help="alternating read / conversion pairs of the 1x ratio (default %(default)s)"
    )
    parser.add_argument("--workdir", help="where to write the inputs (default: a temporary folder)")
    parser.add_argument(
        "--compressions",
        default="zstd,none",
        help="comma-separated extra shard compressions to time against the read ('none' = uncompressed; "
        "default %(default)s; '' = skip)",
    )
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ddsc.data.tahoe_writer import synthetic_shard

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        inputs = root / "two.inputs"
        inputs.mkdir()
        shard = inputs / "a.parquet"
        print(f"generating {args.cells:,} cells x ~{args.genes_per_cell} genes ...")
        synthetic_shard(shard, args.cells, args.genes_per_cell)
        os.link(shard, inputs / "b.parquet")
        genes = root / "gene_metadata.parquet"
        ids = range(3, 20003)
        pq.write_table(
            pa.table(
                {"gene_symbol": [f"G{i}" for i in ids], "ensembl_id": [f"E{i}" for i in ids], "token_id": list(ids)}
            ),
            genes,
        )

        base = run_child("import", root / "x", shard, genes)
        # Read and conversion alternate: each pair shares the machine's state of the moment.
        pairs = []
        for attempt in range(args.pairs):
            pairs.append(
                (run_child("read", root / "x", shard, genes), run_child("1", root / f"one{attempt}", shard, genes))
            )
        serial = run_child("1", root / "two", inputs, genes)
        parallel = run_child("2", root / "two2", inputs, genes)
        compressions = list(filter(None, args.compressions.split(",")))
        extra = {c: run_child("1", root / f"c{i}", shard, genes, c) for i, c in enumerate(compressions)}
        codecs = {  # every zstd level on the same raw shards: a steadier comparison than whole conversions
            c: run_child("compress", root / "one0" / "train", shard, genes, c)
            for c in [DEFAULT_COMPRESSION, *compressions]
            if c.startswith("zstd")
        }
        # Last: gigabytes of input written just before the 1x runs slowed them down (page cache, write-back).
        print(f"repeating the shard {args.scale}x over ...")
        big = root / "big.parquet"
        repeat_rows(shard, big, args.scale)
        large = run_child("1", root / "big", big, genes)

    rate = lambda r: r["cells"] / r["seconds"]  # noqa: E731
    cpu_rate = lambda r: r["cells"] / r["cpu_seconds"]  # noqa: E731
    ratios = sorted(rate(one) / rate(read) for read, one in pairs)
    cpu_ratios = sorted(cpu_rate(one) / cpu_rate(read) for read, one in pairs)
    read, one = sorted(pairs, key=lambda p: rate(p[1]) / rate(p[0]))[len(pairs) // 2]  # the median pair
    ones = [one for _, one in pairs]
    report = {
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "cells_per_shard": args.cells,
        "pairs": len(pairs),
        "pyarrow_read_cells_per_s": round(rate(read)),
        "convert_cells_per_s_1_worker": round(rate(one)),
        "ratio_convert_vs_pyarrow_read": round(rate(one) / rate(read), 3),
        "ratio_convert_vs_pyarrow_read_range": [round(ratios[0], 3), round(ratios[-1], 3)],
        "ratio_convert_vs_pyarrow_read_cpu_time": round(cpu_ratios[len(cpu_ratios) // 2], 3),
        "convert_cpu_s_per_wall_s": round(one["cpu_seconds"] / one["seconds"], 2),
        "compression": DEFAULT_COMPRESSION,
        **{f"ratio_compression_alone_vs_pyarrow_read[{c}]": round(rate(r) / rate(read), 3) for c, r in codecs.items()},
        **{f"raw_over_compressed_bytes[{c}]": round(r["size_ratio"], 2) for c, r in codecs.items()},
        **{f"ratio_convert_vs_pyarrow_read[{c}]": round(rate(r) / rate(read), 3) for c, r in extra.items()},
        "scaling_1_to_2_workers": round(rate(parallel) / rate(serial), 3),
        "cpu_count": os.cpu_count(),
        "peak_rss_mb_import_only": round(base["peak_rss_mb"]),
        "peak_rss_mb_worker_1x": round(max(r["peak_rss_mb"] for r in ones)),
        f"peak_rss_mb_worker_{args.scale}x": round(large["peak_rss_mb"]),
        f"rss_ratio_{args.scale}x_vs_1x": round(large["peak_rss_mb"] / max(r["peak_rss_mb"] for r in ones), 3),
        f"convert_cells_per_s_{args.scale}x": round(rate(large)),
        f"ratio_convert_vs_pyarrow_read_{args.scale}x": round(rate(large) / rate(read), 3),  # the median pair's read
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
