"""Snapshot pause and duration by table size; export and import beside raw RocksDB, same run.

    python bench/snapshot_bench.py [--sizes 1000000 10000000] [--dim 128] [--dir /some/ssd/path]

For each size: load the table through `Store.import_table` (staged SST files,
one ingest), dirty 64K cached rows, take three snapshots while a writer thread
keeps updating, restore the first one, and export the whole table (after one untimed scan, so export and
its peer both read a warm page cache). Peers, measured in the same run on
the same data: rocksdict's own iteration over the table's column family (the
ceiling for export) and rocksdict write batches of 10K rows (the usual way to
write rows) and SstFileWriter + ingest of pre-encoded rows (the ceiling of
the import path, which validates, encodes and stages as SST files). Prints rows/s and the ratios, and the
large/small ratio of the write pause (it must stay below 2: the pause must
not grow with the table).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time

import numpy as np
import rocksdict as rd

from kvstore import CacheConfig, Store, TableConfig
from kvstore.rows import RowLayout, encode_keys

CHUNK = 1 << 18
RAW_WRITE_ROWS = 1 << 20


def chunks(n: int, dim: int, block: np.ndarray):
    """Sorted ids 0..n-1 in chunks; weights reuse one random block (no compression gains)."""
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        yield np.arange(start, stop, dtype=np.int64), block[: stop - start]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def snapshot_under_writes(store: Store, name: str, n: int, dim: int, rng) -> dict:
    """Dirty the cache, then snapshot while a writer updates small batches; the writer's
    worst latency during the call is the pause as a client sees it."""
    store.update("t", rng.choice(n, 1 << 16, replace=False), np.ones((1 << 16, dim), np.float32))
    latencies: list[float] = []
    stop = threading.Event()

    def write():
        ids = rng.choice(n, 256, replace=False)
        rows = np.ones((256, dim), np.float32)
        while not stop.is_set():
            start = time.perf_counter()
            store.update("t", ids, rows)
            latencies.append(time.perf_counter() - start)

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.2)
    before = len(latencies)
    info = store.create_snapshot(name)
    during = latencies[before:len(latencies)] or [0.0]
    stop.set()
    writer.join()
    return {"pause": info.pause_seconds, "duration": info.duration_seconds,
            "writer_max": max(during + latencies[len(latencies) - 1:])}


def raw_iteration(store: Store) -> float:
    cf = store.rocks._families["t"]
    opts = rd.ReadOptions()
    opts.fill_cache(False)
    count = 0
    start = time.perf_counter()
    for _key, _value in cf.items(read_opt=opts):
        count += 1
    return count / (time.perf_counter() - start)


def raw_write_batches(store: Store, dim: int, block: np.ndarray) -> float:
    """rocksdict write batches of 10K rows into a scratch column family."""
    layout = RowLayout.of(store.describe_table("t"))
    store.rocks.create_family("scratch")
    handle = store.rocks._handles["scratch"]
    rows = layout.empty(10_000)
    layout.weights(rows)[:] = block[:10_000]
    values = layout.to_values(rows)
    start = time.perf_counter()
    for base in range(0, RAW_WRITE_ROWS, 10_000):
        batch = rd.WriteBatch(raw_mode=True)
        batch.set_default_column_family(handle)
        for key, value in zip(encode_keys(np.arange(base, base + 10_000)), values, strict=True):
            batch.put(key, value)
        store.rocks._db.write(batch)
    rate = RAW_WRITE_ROWS // 10_000 * 10_000 / (time.perf_counter() - start)
    store.rocks.drop_family("scratch")
    return rate


def raw_sst_ingest(store: Store, block: np.ndarray) -> float:
    """rocksdict SstFileWriter + ingest of pre-encoded rows: the ceiling of the import path."""
    layout = RowLayout.of(store.describe_table("t"))
    rows = layout.empty(CHUNK)
    layout.weights(rows)[:] = block
    values = layout.to_values(rows)
    store.rocks.create_family("scratch")
    path = f"{store.data_dir}/raw.sst"
    start = time.perf_counter()
    writer = rd.SstFileWriter(store.rocks._options())
    writer.open(path)
    for base in range(0, RAW_WRITE_ROWS, CHUNK):
        for key, value in zip(encode_keys(np.arange(base, base + CHUNK)), values, strict=True):
            writer[key] = value
    writer.finish()
    store.rocks.ingest("scratch", [path])
    rate = RAW_WRITE_ROWS / (time.perf_counter() - start)
    store.rocks.drop_family("scratch")
    return rate


def run_size(n: int, dim: int, root: str) -> dict:
    path = tempfile.mkdtemp(prefix=f"snap-{n}-", dir=root)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((CHUNK, dim)).astype(np.float32)
    try:
        with Store(path) as store:
            store.create_table(TableConfig(name="t", dim=dim, cache=CacheConfig(rows=1 << 16)))
            _, load_s = timed(lambda: store.import_table("t", chunks(n, dim, block), mode="replace"))
            snaps = [snapshot_under_writes(store, f"s{i}", n, dim, rng) for i in range(3)]
            _, restore_s = timed(lambda: store.restore_snapshot("s0"))
            raw_iteration(store)                 # untimed: both scans below read a warm page cache
            export_rows, export_s = timed(lambda: sum(len(c) for c in store.export_table("t")))
            raw_iter = raw_iteration(store)
            raw_write = raw_write_batches(store, dim, block)
            raw_sst = raw_sst_ingest(store, block)
        return {
            "rows": n, "import": n / load_s, "raw_write": raw_write, "raw_sst": raw_sst,
            "export": export_rows / export_s, "raw_iter": raw_iter,
            "pause": statistics.median(s["pause"] for s in snaps),
            "duration": statistics.median(s["duration"] for s in snaps),
            "writer_max": max(s["writer_max"] for s in snaps), "restore": restore_s,
        }
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dir", default=None, help="where the data goes (default: the temp dir)")
    args = parser.parse_args()
    results = []
    for n in args.sizes:
        r = run_size(n, args.dim, args.dir)
        results.append(r)
        print(f"{n:>11,} rows x {args.dim}: snapshot pause {1e3 * r['pause']:7.2f} ms (median of 3), "
              f"duration {r['duration']:6.2f} s, writer worst latency {1e3 * r['writer_max']:7.1f} ms, "
              f"restore {r['restore']:6.2f} s")
        print(f"{'':>11}  export {r['export']:>10,.0f} rows/s vs raw iteration {r['raw_iter']:>10,.0f} rows/s "
              f"(ratio {r['export'] / r['raw_iter']:.2f})")
        print(f"{'':>11}  import {r['import']:>10,.0f} rows/s vs raw write batches {r['raw_write']:>10,.0f} rows/s "
              f"(ratio {r['import'] / r['raw_write']:.2f}), vs raw SST write + ingest {r['raw_sst']:>10,.0f} "
              f"rows/s (ratio {r['import'] / r['raw_sst']:.2f})", flush=True)
    if len(results) > 1:
        small, large = results[0], results[-1]
        print(f"pause ratio {large['rows']:,}/{small['rows']:,} rows: {large['pause'] / small['pause']:.2f} "
              f"(must stay below 2); duration ratio {large['duration'] / small['duration']:.2f}; "
              f"restore ratio {large['restore'] / small['restore']:.2f}")


if __name__ == "__main__":
    main()
