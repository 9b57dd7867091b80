"""Write-back flush: CPU per dirty row written to RocksDB, this checkout beside another. Not a test.

A table of `--rows` rows (dim 128, every row cached) is loaded and flushed; then each
repetition updates `--dirty` random rows and times `Store.flush()`, which hands them to the
writer and waits until RocksDB has them. RocksDB's write batch holds the GIL (rocksdict), so
this CPU is time every request thread of the server waits. With `--baseline DIR` the same run
is made from another checkout's packages, the two in turns, and the ratio printed.

    python bench/flush_bench.py [--rows 400000] [--dirty 60000] [--reps 5] [--baseline DIR] [--turns 2]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))   # `bench` importable; PYTHONPATH's kvstore first
from bench.report import python_env  # noqa: E402


def measure(rows: int, dirty: int, reps: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per dirty row flushed, in this process, with the packages on its path."""
    import numpy as np

    from kvstore import CacheConfig, Store, TableConfig

    store = Store(tempfile.mkdtemp(prefix="flush-bench-"))
    try:
        store.create_table(TableConfig("t", 128, cache=CacheConfig(rows=2 * rows, flush_seconds=3600)))
        weights = np.random.default_rng(0).standard_normal((rows, 128), dtype=np.float32)
        for lo in range(0, rows, 50_000):
            store.update("t", np.arange(lo, min(lo + 50_000, rows)), weights[lo:lo + 50_000])
        store.flush()
        rng, wall, cpu = np.random.default_rng(1), 0.0, 0.0
        for _ in range(reps):
            ids = rng.choice(rows, dirty, replace=False)
            store.update("t", ids, weights[ids] + 1)
            start, used = time.perf_counter(), time.process_time()
            store.flush()
            wall += time.perf_counter() - start
            cpu += time.process_time() - used
        return wall / reps / dirty * 1e6, cpu / reps / dirty * 1e6
    finally:
        store.close()


def run_in(root: str, args) -> tuple[float, float]:
    out = subprocess.run([sys.executable, __file__, "--child", "--rows", str(args.rows), "--dirty", str(args.dirty),
                          "--reps", str(args.reps)], env=python_env(root), capture_output=True, text=True, check=True)
    where, wall, cpu = out.stdout.split()[-3:]
    if Path(where).resolve() != Path(root).resolve():
        raise RuntimeError(f"the run for {root} imported kvstore from {where}")
    return float(wall), float(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--dirty", type=int, default=60_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--baseline", default="", help="another checkout, run in turns with this one")
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import kvstore
        print(Path(kvstore.__file__).parent.parent, *measure(args.rows, args.dirty, args.reps))
        return
    roots = {"this": str(Path(__file__).resolve().parent.parent)}
    if args.baseline:
        roots["baseline"] = args.baseline
    cpu = {name: [] for name in roots}
    for turn in range(args.turns):
        for name, root in roots.items():
            wall, used = run_in(root, args)
            cpu[name].append(used)
            print(f"turn {turn} {name:8}: {wall:.2f} µs wall, {used:.2f} µs CPU per dirty row flushed", flush=True)
    if args.baseline:
        ratios = (f"{b / t:.2f}" for t, b in zip(cpu["this"], cpu["baseline"], strict=True))
        print("CPU per row, baseline over this:", " / ".join(ratios))


if __name__ == "__main__":
    main()
