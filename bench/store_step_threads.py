"""CPU of each of a store's threads per training step, in process, for one tree or two in turns.

The example recommender's steps without gRPC: for each step, both tables' unique ids are looked
up (`init_insert`) and then stepped with `apply_gradients` on a `Store` (dim 64, Adagrad, a
2**18-row cache; users uniform over `--users`, items Zipf, as in bench/training_bench.py). After
the warm-up, prints the process's CPU per step and each thread's (writer, store calls, RocksDB's
memtable flushes and compactions, read threads, flusher), the rows the writer wrote per step and
its CPU per row: where a server's CPU per step goes, with the gRPC path left out. With
`--baseline DIR` (a checkout of an earlier kvstore) that tree runs the same steps in turns.

    python bench/store_step_threads.py [--batch 8192] [--steps 80] [--warmup 40] [--pairs 2] [--baseline DIR]
                                       [--write-buffer-bytes 67108864]
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("users", "items")


def thread_seconds() -> collections.Counter:
    """CPU seconds of this process's threads so far, by name (numbered pool threads summed)."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    out: collections.Counter = collections.Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as comm:
                name = names.get(int(tid)) or comm.read().strip()
        except OSError:
            continue
        out[name.rstrip("0123456789_")] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def measure(args) -> None:
    """One tree's run (the tree whose kvstore is on the path), printed."""
    sys.path.insert(0, str(ROOT / "examples"))
    from kvstore_server.allocator import keep_freed_memory
    from train_recsys import synthetic_clicks

    from kvstore import RocksConfig, Store, TableConfig

    keep_freed_memory()                              # as kvstore-server does
    users, items, _ = synthetic_clicks((args.warmup + args.steps) * args.batch, args.users, 100_000, 8, seed=0)
    rng = np.random.default_rng(0)
    rocks = RocksConfig(write_buffer_bytes=args.write_buffer_bytes)
    with tempfile.TemporaryDirectory(prefix="kvsteps-") as data_dir, Store(data_dir, rocks=rocks) as store:
        for table in TABLES:
            store.create_table(TableConfig.from_dict({"name": table, "dim": 64, "cache": {"rows": 1 << 18},
                                                      "optimizer": {"name": "adagrad", "lr": 0.1}}))

        def step(i: int) -> None:
            batch = slice(i * args.batch, (i + 1) * args.batch)
            for table, ids in zip(TABLES, (users[batch], items[batch].ravel()), strict=True):
                unique = np.unique(ids)
                store.lookup(table, unique)
                store.apply_gradients(table, unique, rng.standard_normal((len(unique), 64), np.float32) * 0.01)

        def written() -> float:
            return sum(store.stats(table).get("rows_written", 0) for table in TABLES)

        for i in range(args.warmup):
            step(i)
        rows, before, start = written(), thread_seconds(), time.process_time()
        for i in range(args.warmup, args.warmup + args.steps):
            step(i)
        used, after, rows = time.process_time() - start, thread_seconds(), written() - rows
    per_step = {name: 1000 * (after[name] - before[name]) / args.steps for name in after}
    writer = after["kvstore-writer"] - before["kvstore-writer"]
    print(f"  process CPU {1000 * used / args.steps:.1f} ms/step; written {rows / args.steps:,.0f} rows/step, "
          f"writer {1e6 * writer / max(rows, 1):.2f} us/row")
    print("  " + ", ".join(f"{name} {ms:.1f}" for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])
                           if ms >= 0.05))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--pairs", type=int, default=2, help="turns of each tree")
    parser.add_argument("--write-buffer-bytes", type=int, default=64 << 20, help="RocksDB memtable size per table")
    parser.add_argument("--baseline", help="an earlier kvstore checkout run in turns with this one")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)    # a single run, this process
    args = parser.parse_args()
    if args.one:
        measure(args)
        return
    sys.path.insert(0, str(ROOT))               # the runs below import the tree they measure; this one, bench
    from bench.report import python_env
    print(f"store step threads: batch {args.batch}, {args.steps} steps after {args.warmup}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()}; CPU ms per step by thread")
    trees = [("this", ROOT)] + ([("baseline", Path(args.baseline).resolve())] if args.baseline else [])
    forwarded = [arg for arg in sys.argv[1:] if arg != "--one"]
    for turn in range(args.pairs):
        for label, tree in trees:
            print(f"{label} (turn {turn + 1}):", flush=True)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *forwarded, "--one"],
                           env=python_env(tree), check=True)


if __name__ == "__main__":
    main()
