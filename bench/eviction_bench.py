"""Lookup throughput while an eviction sweep runs at the default rate, beside the same
lookups with no sweep, in the same run on the same table.

    python bench/eviction_bench.py [--rows 1000000] [--dim 64] [--slices 30] [--slice-seconds 0.3]

The table holds `rows` rows and a cache of a quarter of them. First, all-hit lookups
with the per-hit header write (access count, last access) beside the same lookups with
it switched off. Then the sweep: lookups are batches of 4,096 ids drawn from a Zipf(1.1)
law over the table, so most hit the cache and some go to RocksDB; the sweep is the real
one (`sweep_table`, with TTL and a capacity limit set so that no row leaves), run back
to back in a thread at the rate `SweeperConfig` ships with. Short slices alternate
(feature off / on), so that other load on the machine weighs on both sides alike; each
ratio is the median over adjacent pairs of slices (on / off).
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time

import numpy as np

from kvstore import CacheConfig, EvictionConfig, Store, SweeperConfig, TableConfig
from kvstore.eviction.sweep import sweep_table
from kvstore.eviction.sweeper import RateLimiter


class GatedLimiter(RateLimiter):
    """The store's rate limiter, plus a gate: while closed, the sweep waits between chunks."""

    def __init__(self, rate: float):
        super().__init__(rate)
        self.open = threading.Event()
        self.rows = 0

    def acquire(self, n: int) -> None:
        self.open.wait()
        super().acquire(n)
        self.rows += n


def lookups_per_second(store: Store, batches: list[np.ndarray], seconds: float) -> float:
    done, i = 0, 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        store.lookup("t", batches[i % len(batches)])
        done += len(batches[i % len(batches)])
        i += 1
    return done / (time.perf_counter() - began)


def touch_cost(store: Store, args) -> None:
    """All-hit lookups recording accesses in the row headers, beside the same lookups with the
    header write switched off (the peer: lookups as they were before access metadata)."""
    tracker = store.table("t").eviction
    hot = [np.random.default_rng(i).integers(0, args.rows // 8, 4096) for i in range(16)]
    store.lookup("t", np.unique(np.concatenate(hot)))      # all cached now
    record = tracker.touch
    with_touch, without = [], []
    for _ in range(args.slices):
        tracker.touch = record
        with_touch.append(lookups_per_second(store, hot, args.slice_seconds / 2))
        tracker.touch = lambda *_: None
        without.append(lookups_per_second(store, hot, args.slice_seconds / 2))
    tracker.touch = record
    pairs = np.array(with_touch) / np.array(without)
    print(f"all-hit lookup, header touch on: {np.median(with_touch):,.0f} rows/s; off: {np.median(without):,.0f} "
          f"rows/s; ratio (paired median) {np.median(pairs):.3f}")


def load(store: Store, rows: int, dim: int) -> None:
    step = 1 << 16
    rng = np.random.default_rng(0)
    for lo in range(0, rows, step):
        ids = np.arange(lo, min(rows, lo + step))
        store.update("t", ids, rng.normal(size=(len(ids), dim)).astype(np.float32))
    store.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--slices", type=int, default=30)
    parser.add_argument("--slice-seconds", type=float, default=0.3)
    parser.add_argument("--rate", type=float, default=SweeperConfig().rows_per_second)
    parser.add_argument("--chunk", type=int, default=SweeperConfig().chunk_rows)
    args = parser.parse_args()

    cache_rows = max(1024, args.rows // 4 // 32 * 32)
    eviction = EvictionConfig(ttl_seconds=30 * 86400, max_rows=args.rows * 2)
    config = TableConfig("t", args.dim, cache=CacheConfig(rows=cache_rows), eviction=eviction)
    with tempfile.TemporaryDirectory() as data_dir, Store(data_dir, sweeper=SweeperConfig(enabled=False)) as store:
        store.create_table(config)
        began = time.perf_counter()
        load(store, args.rows, args.dim)
        print(f"loaded {args.rows:,} rows of dim {args.dim} in {time.perf_counter() - began:.1f} s; "
              f"cache {cache_rows:,} rows; sweep rate {args.rate:,.0f} rows/s in chunks of {args.chunk}")
        rng = np.random.default_rng(1)
        p = np.arange(1, args.rows + 1, dtype=np.float64) ** -1.1
        p /= p.sum()
        batches = [rng.choice(args.rows, 4096, p=p) for _ in range(64)]
        lookups_per_second(store, batches, 1.0)                 # warm the cache
        touch_cost(store, args)

        limiter = GatedLimiter(args.rate)
        stop = threading.Event()
        table = store.table("t")

        def sweep_forever() -> None:
            while not stop.is_set():
                sweep_table(table, limiter, args.chunk, stop.is_set)

        thread = threading.Thread(target=sweep_forever, daemon=True)
        thread.start()
        without, with_sweep, scanned = [], [], []
        for _ in range(args.slices):
            limiter.open.clear()
            time.sleep(0.02)                                    # a chunk in flight finishes
            without.append(lookups_per_second(store, batches, args.slice_seconds))
            limiter.open.set()
            rows = limiter.rows
            with_sweep.append(lookups_per_second(store, batches, args.slice_seconds))
            scanned.append((limiter.rows - rows) / args.slice_seconds)
        stop.set()
        limiter.open.set()
        thread.join()
        a, b = float(np.median(without)), float(np.median(with_sweep))
        pairs = np.array(with_sweep) / np.array(without)
        stats = store.stats("t")
        print(f"lookup without sweep: {a:,.0f} rows/s (median of {args.slices} slices of {args.slice_seconds} s)")
        print(f"lookup with sweep:    {b:,.0f} rows/s; sweep scanned {np.median(scanned):,.0f} rows/s meanwhile")
        print(f"sweeps run {stats.get('sweeps', 0):.0f}, rows evicted {stats.get('evicted_rows', 0):.0f}")
        print(f"ratio of medians: {b / a:.3f}; paired slices: median {np.median(pairs):.3f}, "
              f"quartiles {np.percentile(pairs, 25):.3f}-{np.percentile(pairs, 75):.3f}")
        print(f"ratio with/without: {np.median(pairs):.3f}")


if __name__ == "__main__":
    main()
