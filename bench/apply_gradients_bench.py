"""In-process Store.apply_gradients against the NumPy limit, side by side in one run. Not a test.

Store side: `Store.apply_gradients(ids, grads)` on a warm, fully cached rowwise-Adagrad
(or, with `--optimizer adagrad`, Adagrad) table, duplicates included (the store sums
them, steps each unique row once, and writes the rows back to its cache).
Reference: the same step on plain in-memory arrays with the duplicates already summed
(not timed): gather the unique rows and accumulators, rowwise Adagrad, scatter them
back (Adagrad: an accumulator per value). It is the limit the store would reach if
summing, validation and the cache were free.

Ids are Zipf over the table's rows (store_bench.IdSampler). Each round runs every
batch through both sides, interleaved batch by batch; the ratio printed is
reference time over store time (1.0: as fast as the limit).

    python bench/apply_gradients_bench.py                    # 1M rows, dim 128
    python bench/apply_gradients_bench.py --rows 200000      # quick run
    python bench/apply_gradients_bench.py --optimizer adagrad --dim 64
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
from kvstore_server.allocator import keep_freed_memory
from store_bench import IdSampler

from kvstore import CacheConfig, OptimizerConfig, Store, TableConfig
from kvstore.optimizers import sum_duplicates

LR, EPS = 0.01, 1e-8


class Reference:
    """Rowwise Adagrad on a plain [rows, dim] array and a [rows] accumulator; Adagrad (`rowwise`
    False) with a [rows, dim] one."""

    def __init__(self, weights: np.ndarray, rowwise: bool = True):
        self.weights = weights.copy()
        self.rowwise = rowwise
        self.accumulator = np.zeros(len(weights) if rowwise else weights.shape, np.float32)

    def step(self, ids: np.ndarray, grads: np.ndarray) -> None:
        rows, acc = self.weights[ids], self.accumulator[ids]
        if self.rowwise:
            acc += (grads * grads).mean(axis=1)
            rows -= np.float32(LR) * grads / (np.sqrt(acc)[:, None] + np.float32(EPS))
        else:
            acc += grads * grads
            rows -= np.float32(LR) * grads / (np.sqrt(acc) + np.float32(EPS))
        self.weights[ids], self.accumulator[ids] = rows, acc


def bench(store: Store, ref: Reference, sampler: IdSampler, batch: int, count: int, rounds: int, dim: int):
    rng = np.random.default_rng(batch)
    batches = [(ids, rng.standard_normal((batch, dim), dtype=np.float32))
               for ids in sampler.batches("zipf", batch, count)]
    summed = [sum_duplicates(ids, grads) for ids, grads in batches]
    for ids, grads in batches:                       # warm: every row cached, buffers allocated
        store.apply_gradients("t", ids, grads)
    store_s = ref_s = 0.0
    for _ in range(rounds):
        for (ids, grads), (uniq, total) in zip(batches, summed, strict=True):
            start = time.perf_counter()
            store.apply_gradients("t", ids, grads)
            middle = time.perf_counter()
            ref.step(uniq, total)
            store_s += middle - start
            ref_s += time.perf_counter() - middle
    unique = np.mean([len(u) for u, _ in summed])
    n = rounds * count
    print(f"{batch:>8,} {unique:>9,.0f} {store_s / n * 1e3:>10.2f} {ref_s / n * 1e3:>10.2f} {ref_s / store_s:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batches", default="4096,65536")
    parser.add_argument("--count", type=int, default=10, help="distinct batches per size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--zipf", type=float, default=1.05)
    parser.add_argument("--optimizer", choices=("rowwise_adagrad", "adagrad"), default="rowwise_adagrad")
    args = parser.parse_args()
    keep_freed_memory()     # as kvstore-server does at start: large buffers reused, not page-faulted in each call
    cache_rows = 32 * int(2 ** np.ceil(np.log2(max(1, 2 * args.rows // 32))))
    print(f"apply_gradients bench: rows={args.rows:,} dim={args.dim} {args.optimizer} zipf s={args.zipf} "
          f"cache rows={cache_rows:,}; {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    data_dir = tempfile.mkdtemp(prefix="step-bench-")
    try:
        store = Store(data_dir)
        store.create_table(TableConfig("t", args.dim, cache=CacheConfig(rows=cache_rows),
                                       optimizer=OptimizerConfig(args.optimizer, lr=LR, eps=EPS)))
        ref = Reference(np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32),
                        rowwise=args.optimizer == "rowwise_adagrad")
        sampler = IdSampler(args.rows, args.zipf, seed=1)
        print(f"{'batch':>8} {'unique':>9} {'store ms':>10} {'ref ms':>10} {'ratio':>7}")
        for batch in (int(b) for b in args.batches.split(",")):
            bench(store, ref, sampler, batch, args.count, args.rounds, args.dim)
        store.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
