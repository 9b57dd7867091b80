"""In-process Store.lookup against its peers, side by side in one run. Not a test.

(a) cache hits: Store.lookup on a warmed cache   vs  NumPy gather `arr[idx]` on a [rows, dim] array
(b) cold rows:  Store.lookup with an empty cache  vs  raw rocksdict multi-get of the same keys
(c) new ids:    Store.lookup (init_insert) of ids never stored  vs  raw multi-get of the same (absent)
                keys: each row is initialized, cached and later written back; the peer only asks
                RocksDB whether the keys exist, the floor under that path (no target: a measure)

Both sides of a comparison see the same batches, interleaved batch by batch, and
the ratio printed is store rows/s over peer rows/s. Ids are uniform or Zipf
(ranks drawn with p ~ 1/k^s, mapped to ids by a fixed permutation).

For (b) the peer opens the store's own database read-only, so both read the same
SST files; before every batch the table's cache is emptied (not timed), so every
row of the batch comes from RocksDB. Each round of (b) draws fresh batches.

    python bench/store_bench.py                      # full run: 1M rows, dim 128 (parts a and b)
    python bench/store_bench.py --rows 100000        # quick run
    python bench/store_bench.py --parts c --batches 1024,4096   # new ids
    python bench/store_bench.py --parts a --reuse-out  # (a) with both sides writing one preallocated array
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import rocksdict as rd

from kvstore import CacheConfig, RocksConfig, Store, TableConfig
from kvstore.rows import encode_keys

TABLE = "bench"
CHUNK = 4096          # key count of the chunked raw reference in (b)


@dataclass
class Row:
    part: str
    dist: str
    batch: int
    store_rows_s: float
    peer: str
    peer_rows_s: float
    target: float | None           # None: a measure, no target
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.store_rows_s / self.peer_rows_s


class IdSampler:
    """Batches of ids over [0, rows): uniform, or Zipf(s) over ranks mapped by a fixed permutation."""

    def __init__(self, rows: int, zipf_s: float, seed: int):
        self.rows = rows
        self.rng = np.random.default_rng(seed)
        self.rank_to_id = self.rng.permutation(rows).astype(np.int64)
        weights = 1.0 / np.arange(1, rows + 1, dtype=np.float64) ** zipf_s
        self.cdf = np.cumsum(weights / weights.sum())

    def batches(self, dist: str, batch: int, count: int) -> list[np.ndarray]:
        if dist == "uniform":
            return [self.rng.integers(0, self.rows, batch, dtype=np.int64) for _ in range(count)]
        ranks = [np.searchsorted(self.cdf, self.rng.random(batch)) for _ in range(count)]
        return [self.rank_to_id[np.minimum(r, self.rows - 1)] for r in ranks]


def load(store: Store, weights: np.ndarray, batch: int) -> float:
    """Load every row through Store.update; returns rows/s (flush included)."""
    start = time.perf_counter()
    for lo in range(0, len(weights), batch):
        ids = np.arange(lo, min(lo + batch, len(weights)), dtype=np.int64)
        store.update(TABLE, ids, weights[lo:lo + len(ids)])
    store.flush()
    return len(weights) / (time.perf_counter() - start)


def table_families(db_path: str, tables: tuple[str, ...]) -> list[str]:
    """The column families holding `tables`' rows (one `name@hex` per incarnation; a fresh
    bench directory holds one incarnation of each)."""
    present = rd.Rdict.list_cf(db_path, rd.Options(raw_mode=True))
    return [next(f for f in present if f == table or f.startswith(f"{table}@")) for table in tables]


def open_raw(db_path: str, family: str | None = None, read_only: bool = False,
             families: tuple[str, ...] = ()) -> tuple[rd.Rdict, rd.Rdict | None]:
    """rocksdict handle on the store's database (raw mode), tuned like the store's RocksDB tier,
    with `family` open, or the families of the tables named in `families` (the first is returned)."""
    opened = ([family] if family else []) + table_families(db_path, families)
    config = RocksConfig()
    cache = rd.Cache(config.block_cache_bytes)

    def options() -> rd.Options:
        opts = rd.Options(raw_mode=True)
        table = rd.BlockBasedOptions()
        table.set_block_cache(cache)
        table.set_bloom_filter(config.bloom_bits_per_key, False)
        table.set_cache_index_and_filter_blocks(True)
        opts.set_block_based_table_factory(table)
        return opts

    access = rd.AccessType.read_only() if read_only else rd.AccessType.read_write()
    db = rd.Rdict(db_path, options(), column_families={name: options() for name in opened}, access_type=access)
    return db, db.get_column_family(opened[0]) if opened else None


def compact(db_path: str, family_name: str) -> str:
    """Full compaction while the store is closed, so both sides of (b) read settled SST files."""
    db, family = open_raw(db_path, family_name, read_only=False)
    try:
        family.compact_range(None, None)
        level0 = family.property_int_value("rocksdb.num-files-at-level0")
        sst = family.property_int_value("rocksdb.total-sst-files-size")
        return f"{level0} files at level 0, {sst / 2**20:,.0f} MiB of SST files"
    finally:
        db.close()


def bench_hits(store: Store, weights: np.ndarray, sampler: IdSampler, dist: str, batch: int,
               sample_rows: int, rounds: int, reuse_out: bool = False) -> Row:
    """`reuse_out`: both sides write every batch into one preallocated array (`Store.lookup(out=)`,
    `np.take(out=)`), so neither pays for fresh result pages (the kernel zeroes each on first touch)."""
    batches = sampler.batches(dist, batch, max(1, sample_rows // batch))
    out = np.empty((batch, weights.shape[1]), weights.dtype) if reuse_out else None
    for ids in batches:                                    # warm the cache with the whole working set
        store.lookup(TABLE, ids, on_miss="error")
    np.testing.assert_array_equal(store.lookup(TABLE, batches[0]).weights, weights[batches[0]])
    before = store.stats(TABLE)
    t_store = t_peer = 0.0
    for _ in range(rounds):
        for ids in batches:
            start = time.perf_counter()
            store.lookup(TABLE, ids, on_miss="error", out=out)
            mid = time.perf_counter()
            if out is None:
                weights[ids]
            else:
                np.take(weights, ids, axis=0, out=out)
            t_peer += time.perf_counter() - mid
            t_store += mid - start
    after = store.stats(TABLE)
    misses = after.get("cache_misses", 0) - before.get("cache_misses", 0)
    hits = after.get("cache_hits", 0) - before.get("cache_hits", 0)
    rows = rounds * sum(len(ids) for ids in batches)
    note = f"hit rate {hits / max(hits + misses, 1):.4f}, {len(np.unique(np.concatenate(batches)))} distinct ids"
    return Row("a", dist, batch, rows / t_store, "numpy take(out=)" if reuse_out else "numpy arr[idx]",
               rows / t_peer, 0.5, note)


def bench_cold(store: Store, raw_family, weights: np.ndarray, sampler: IdSampler, dist: str,
               batch: int, sample_rows: int, rounds: int) -> Row:
    """Store and peer read the same keys (who goes first alternates). For batches over
    CHUNK ids a reference reads its own fresh batch in CHUNK-key gets, reported in the note."""
    cache = store.table(TABLE).cache
    t_store = t_peer = t_chunked = 0.0
    rows = 0
    for _ in range(rounds):
        count = max(1, sample_rows // batch)
        batches = sampler.batches(dist, batch, count)
        keys = [encode_keys(ids) for ids in batches]
        chunked = [encode_keys(ids) for ids in sampler.batches(dist, batch, count)] if batch > CHUNK else []
        for i, (ids, batch_keys) in enumerate(zip(batches, keys, strict=True)):
            cache.clear()                                  # every row of the batch comes from RocksDB
            for side in ("store", "peer") if i % 2 == 0 else ("peer", "store"):   # alternate who goes first
                start = time.perf_counter()
                if side == "store":
                    found = store.lookup(TABLE, ids, on_miss="error")
                    t_store += time.perf_counter() - start
                else:
                    values = raw_family.get(batch_keys)
                    t_peer += time.perf_counter() - start
            rows += len(ids)
            if chunked:
                start = time.perf_counter()
                for lo in range(0, batch, CHUNK):
                    raw_family.get(chunked[i][lo:lo + CHUNK])
                t_chunked += time.perf_counter() - start
        if values[-1] is None or not np.array_equal(found.weights, weights[ids]):
            raise RuntimeError("cold lookup returned wrong rows")
    unique = np.mean([len(np.unique(ids)) / len(ids) for ids in batches])
    note = f"unique ids per batch {unique:.2f}"
    if t_chunked:
        note += f"; raw get in {CHUNK}-key calls: {rows / t_chunked:,.0f} rows/s"
    return Row("b", dist, batch, rows / t_store, "raw rocksdict get", rows / t_peer, 0.7, note)


def bench_new(store: Store, raw_family, sampler: IdSampler, dist: str, batch: int, sample_rows: int,
              rounds: int, next_id: list[int]) -> Row:
    """Lookups of ids no batch has used before (above the table's rows, from `next_id`), beside a
    raw multi-get of the same keys, which RocksDB answers as absent; who goes first alternates.
    `dist` only labels the row: new ids are new whatever their distribution."""
    t_store = t_peer = 0.0
    rows = 0
    before = store.stats(TABLE)
    for _ in range(rounds):
        for i in range(max(1, sample_rows // batch)):
            ids = np.arange(next_id[0], next_id[0] + batch, dtype=np.int64)[sampler.rng.permutation(batch)]
            next_id[0] += batch
            keys = encode_keys(ids)
            for side in ("store", "peer") if i % 2 == 0 else ("peer", "store"):
                start = time.perf_counter()
                if side == "store":
                    store.lookup(TABLE, ids)
                    t_store += time.perf_counter() - start
                else:
                    values = raw_family.get(keys)
                    t_peer += time.perf_counter() - start
            if any(v is not None for v in values):
                raise RuntimeError("new ids were found in RocksDB before their first lookup")
            rows += len(ids)
    created = store.stats(TABLE).get("rows_initialized", 0) - before.get("rows_initialized", 0)
    if created != rows:
        raise RuntimeError(f"{rows} new ids looked up, {created} rows initialized")
    return Row("c", dist, batch, rows / t_store, "raw get (absent)", rows / t_peer, None,
               f"{rows:,} rows initialized and cached")


def print_table(results: list[Row]) -> None:
    header = f"{'part':4} {'ids':8} {'batch':>6} {'store rows/s':>13} {'peer':18} {'peer rows/s':>12} " \
             f"{'ratio':>6} {'target':>6}  note"
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        flag = "" if r.target is None else "ok" if r.ratio >= r.target else "MISS"
        target = "-" if r.target is None else f">={r.target}"
        print(f"{r.part:4} {r.dist:8} {r.batch:>6} {r.store_rows_s:>13,.0f} {r.peer:18} {r.peer_rows_s:>12,.0f} "
              f"{r.ratio:>6.2f} {target:>6} {flag:4} {r.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the table")
    parser.add_argument("--dim", type=int, default=128, help="float32 values per row")
    parser.add_argument("--batches", default="4096,65536", help="batch sizes, comma separated")
    parser.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent s")
    parser.add_argument("--hit-rows", type=int, default=1 << 20, help="ids per case for (a), per round")
    parser.add_argument("--cold-rows", type=int, default=1 << 18, help="ids per case for (b), per round")
    parser.add_argument("--new-rows", type=int, default=1 << 16, help="ids per case for (c), per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case")
    parser.add_argument("--load-batch", type=int, default=65536, help="rows per Store.update while loading")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="data directory (default: a temporary one, removed after)")
    parser.add_argument("--parts", default="ab", help="which parts to run: any of a, b and c")
    parser.add_argument("--reuse-out", action="store_true",
                        help="(a): both sides gather into one preallocated array (no fresh result pages)")
    args = parser.parse_args()
    sizes = [int(b) for b in args.batches.split(",")]

    # a cache of 4x the table's rows: 32-way sets never overflow, so (a) is all hits
    cache_rows = 32 * int(2 ** np.ceil(np.log2(max(1, 4 * args.rows // 32))))
    print(f"kvstore store bench: rows={args.rows:,} dim={args.dim} float32 batches={sizes} zipf s={args.zipf} "
          f"cache rows={cache_rows:,}; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"numpy {np.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    data_dir = args.dir or tempfile.mkdtemp(prefix="store-bench-")
    try:
        weights = np.random.default_rng(args.seed).standard_normal((args.rows, args.dim), dtype=np.float32)
        sampler = IdSampler(args.rows, args.zipf, args.seed + 1)
        config = TableConfig(name=TABLE, dim=args.dim, cache=CacheConfig(rows=cache_rows))
        store = Store(data_dir)
        store.create_table(config)
        rate = load(store, weights, args.load_batch)
        print(f"loaded {args.rows:,} rows through Store.update at {rate:,.0f} rows/s")
        db_path = store.rocks.path
        family = store.table(TABLE).family        # the table's column family (one per incarnation)
        store.close()
        start = time.perf_counter()
        layout = compact(db_path, family)
        print(f"compacted in {time.perf_counter() - start:.1f} s: {layout}")

        results: list[Row] = []
        next_id = [args.rows]              # (c): ids above the table's rows, none of them stored
        store = Store(data_dir)            # freshly reopened: empty cache
        raw_db, raw_family = open_raw(db_path, family, read_only=True)
        try:
            for part in args.parts:
                for dist in ("uniform",) if part == "c" else ("uniform", "zipf"):
                    for batch in sizes:
                        if part == "c":
                            row = bench_new(store, raw_family, sampler, dist, batch, args.new_rows, args.rounds,
                                            next_id)
                        elif part == "a":
                            row = bench_hits(store, weights, sampler, dist, batch, args.hit_rows, args.rounds,
                                             args.reuse_out)
                        else:
                            row = bench_cold(store, raw_family, weights, sampler, dist, batch,
                                             args.cold_rows, args.rounds)
                        results.append(row)
                        print_table([row])
        finally:
            raw_db.close()
            store.close()
        print_table(results)
    finally:
        if args.dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
