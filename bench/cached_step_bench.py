"""A write-back table's gradient step of cached rows: the tier's one call beside the staged path.

`Table.apply_gradients` on a write-back table whose cache holds every id takes the tier's
`step_cached` (on a GPU: one wait for the device); otherwise, and after a step that met a new
row, the staged path (probe, stage, step, publish: two waits on a GPU). Both run here in the
same process, in turns, on the same kind of batches (Adagrad, dim 64, ids drawn from 20,000
cached rows; "10% new" puts never-seen ids in each batch), per cache device. Prints the
calling thread's CPU and wall ms per call of each and the CPU ratio one call / staged (medians
of the rounds). Not a test.

    python bench/cached_step_bench.py [--devices cpu,cuda:0] [--batches 1024,8192] [--calls 150]
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time

import numpy as np

from kvstore import CacheConfig, OptimizerConfig, Store, TableConfig

CACHED = 20_000       # rows looked up (so cached) before timing


def per_call(table, batches: list[np.ndarray], grads: np.ndarray, warm: int = 10) -> tuple[float, float]:
    """(CPU ms, wall ms) per apply_gradients call over `batches` after `warm` untimed calls."""
    for ids in batches[:warm]:
        table.apply_gradients(ids, grads)
    cpu, wall = time.thread_time(), time.perf_counter()
    for ids in batches[warm:]:
        table.apply_gradients(ids, grads)
    calls = len(batches) - warm
    return (time.thread_time() - cpu) / calls * 1e3, (time.perf_counter() - wall) / calls * 1e3


def batches(rng, count: int, batch: int, new_ids=None) -> list[np.ndarray]:
    """`count` batches of distinct cached ids; with `new_ids` (an iterator), a tenth of each new."""
    out = [rng.choice(CACHED, batch, replace=False) for _ in range(count)]
    if new_ids is not None:
        for ids in out:
            ids[:batch // 10] = list(itertools.islice(new_ids, batch // 10))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="cpu", help="cache devices, comma-separated (cpu, cuda:0, ...)")
    parser.add_argument("--batches", default="1024,8192")
    parser.add_argument("--calls", type=int, default=150, help="timed calls per turn")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    devices = args.devices.split(",")
    rng = np.random.default_rng(1)
    new_ids = itertools.count(10**9, 97)
    with Store(tempfile.mkdtemp(prefix="kvstep-")) as store:
        tables = {}
        for device in devices:
            name = device.replace(":", "")
            store.create_table(TableConfig(name=name, dim=64, optimizer=OptimizerConfig(name="adagrad", lr=0.01),
                                           cache=CacheConfig(rows=1 << 20, ways=32, device=device)))
            store.lookup(name, np.arange(CACHED))
            tables[device] = store.table(name)
        for batch, kind in itertools.product(map(int, args.batches.split(",")), ("cached", "10% new")):
            grads = rng.standard_normal((batch, 64)).astype(np.float32)

            count, source = args.calls + 10, new_ids if kind != "cached" else None
            times: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for _ in range(args.rounds):
                for device, table in tables.items():
                    turn = batches(rng, count, batch, source)
                    times.setdefault((device, "one call"), []).append(per_call(table, turn, grads))
                    table._step_cached = lambda *a: False          # the staged path alone
                    try:
                        turn = batches(rng, count, batch, source)
                        times.setdefault((device, "staged"), []).append(per_call(table, turn, grads))
                    finally:
                        del table._step_cached
            for device in devices:
                one, staged = times[(device, "one call")], times[(device, "staged")]
                shown = [" ".join(f"{c:.3f}/{w:.3f}" for c, w in runs) for runs in (one, staged)]
                ratio = np.median([c for c, _ in one]) / np.median([c for c, _ in staged])
                print(f"batch {batch:5d} {kind:8s} {device:7s} CPU/wall ms a call: one call {shown[0]} | "
                      f"staged {shown[1]} | CPU one call / staged {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
