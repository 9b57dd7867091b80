"""In-process lookups of cached rows with the host cache on 4 KiB pages and on huge pages, in turns.

Two stores in one process take turns (fresh store each pass, `--passes` passes): one whose cache
arrays are plain pages (`huge_pages.MIN_BYTES` raised past every array) and one with the default
(arrays of 8 MiB and more advised `MADV_HUGEPAGE`). Each loads `--rows` rows of dim 128 float32
into a cache of twice as many slots, then times `Store.lookup_if_cached` (probe, access stamps,
gather: the server's event-loop path) on uniform batches of cached ids. Prints the median per
call of each (best pass) and the gain.

    python bench/huge_pages_bench.py [--rows 1000000] [--batches 4096,65536] [--passes 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from kvstore import CacheConfig, Store, TableConfig, huge_pages

DIM = 128


def lookup_ms(rows: int, batches: list[int], huge: bool, rng) -> dict[int, float]:
    """Median ms per lookup_if_cached call of each batch size, in a fresh store."""
    default = huge_pages.MIN_BYTES
    huge_pages.MIN_BYTES = default if huge else 1 << 62
    try:
        with tempfile.TemporaryDirectory() as path, Store(str(Path(path) / "data")) as store:
            store.create_table(TableConfig(name="t", dim=DIM, cache=CacheConfig(rows=2 * rows)))
            for start in range(0, rows, 65536):
                ids = np.arange(start, min(rows, start + 65536))
                store.update("t", ids, rng.standard_normal((len(ids), DIM), dtype=np.float32))
            store.lookup("t", np.arange(rows))
            cached = np.flatnonzero(store.table("t").cache.probe(np.arange(rows)) >= 0)
            medians = {}
            for batch in batches:
                times = []
                for _ in range(max(20, 2_000_000 // batch)):
                    ids = cached[rng.integers(0, len(cached), batch)]
                    start = time.perf_counter()
                    if store.lookup_if_cached("t", ids) is not None:   # None: the flusher held the table
                        times.append(time.perf_counter() - start)
                medians[batch] = float(np.median(times)) * 1e3
            return medians
    finally:
        huge_pages.MIN_BYTES = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batches", default="4096,65536")
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    best: dict[tuple[int, bool], float] = {}
    for _ in range(args.passes):
        for huge in (False, True):
            for batch, ms in lookup_ms(args.rows, batches, huge, rng).items():
                best[batch, huge] = min(ms, best.get((batch, huge), float("inf")))
    for batch in batches:
        plain, huge = best[batch, False], best[batch, True]
        print(f"rows {args.rows:,} batch {batch:>6}: 4 KiB pages {plain:.3f} ms, huge pages {huge:.3f} ms, "
              f"gain {plain / huge:.2f}x")


if __name__ == "__main__":
    main()
