"""Write stalls of snapshots and exports with many dirty rows, each beside its idle peer in one run.

    python bench/durability_bench.py [--rows 300000] [--dim 16] [--dir /some/ssd/path]

1. Snapshot write stall: a write-back table holds `rows` dirty cached rows; a writer thread
   updates 64 rows per call while `create_snapshot` runs. Prints the writer's p99 and max call
   time during the snapshot beside its p99 before it (idle), and the snapshot's own write pause,
   without and with an eviction rule (ttl_seconds, which makes the tracker take part in flushes).
2. Cross-table stall: table B holds `rows` dirty rows; lookups of 512 cached rows of table A run
   while B's export starts and streams. Prints A's lookup p99 during the export beside its idle
   p99 (target: within 2x): in process (`Store.export_table`), and through a server process
   (client lookups of A from this process while the `kvstore export` command exports B).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from kvstore import CacheConfig, Store, TableConfig
from kvstore.config import EvictionConfig


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000, q)) if samples else float("nan")


def timed_loop(call, stop: threading.Event, samples: list[float]) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        call()
        samples.append(time.perf_counter() - began)


def dirty_table(store: Store, name: str, rows: int, dim: int, eviction: EvictionConfig | None = None) -> None:
    slots = 1 << (rows * 2 - 1).bit_length()
    store.create_table(TableConfig(name=name, dim=dim, eviction=eviction or EvictionConfig(),
                                   cache=CacheConfig(rows=slots, flush_seconds=3600.0)))
    for start in range(0, rows, 65536):
        ids = np.arange(start, min(rows, start + 65536))
        store.update(name, ids, np.ones((len(ids), dim), np.float32))


def during(store_call, background, idle_seconds: float = 1.0) -> tuple[list[float], list[float], object]:
    """Samples of `background` for `idle_seconds` alone, then while `store_call` runs."""
    idle, busy = [], []
    stop = threading.Event()
    thread = threading.Thread(target=timed_loop, args=(background, stop, idle))
    thread.start()
    time.sleep(idle_seconds)
    stop.set()
    thread.join()
    stop = threading.Event()
    thread = threading.Thread(target=timed_loop, args=(background, stop, busy))
    thread.start()
    result = store_call()
    stop.set()
    thread.join()
    return idle, busy, result


def snapshot_stall(directory: str, rows: int, dim: int, rule: bool) -> None:
    with Store(directory) as store:
        eviction = EvictionConfig(ttl_seconds=86400) if rule else None
        dirty_table(store, "t", rows, dim, eviction)
        rng = np.random.default_rng(0)
        weights = np.ones((64, dim), np.float32)
        idle, busy, info = during(lambda: store.create_snapshot("s"),
                                  lambda: store.update("t", rng.integers(0, rows, 64), weights))
        label = "ttl rule" if rule else "no rule "
        print(f"snapshot, {rows} dirty rows, {label}: writer p99 idle {percentile(idle, 99):.2f} ms, "
              f"during {percentile(busy, 99):.2f} ms (max {max(busy) * 1000:.1f} ms, {len(busy)} calls); "
              f"pause {info.pause_seconds * 1000:.1f} ms; snapshot {info.duration_seconds:.2f} s")


def export_stall(directory: str, rows: int, dim: int) -> None:
    with Store(directory) as store:
        store.create_table(TableConfig(name="a", dim=dim, cache=CacheConfig(rows=4096)))
        hot = np.arange(512)
        store.update("a", hot, np.ones((512, dim), np.float32))
        dirty_table(store, "b", rows, dim)

        def export() -> int:
            return sum(len(chunk) for chunk in store.export_table("b"))
        idle, busy, exported = during(export, lambda: store.lookup("a", hot))
        print(f"lookup of table a while table b exports {exported} dirty rows: p99 idle {percentile(idle, 99):.2f} ms, "
              f"during {percentile(busy, 99):.2f} ms (ratio {percentile(busy, 99) / percentile(idle, 99):.2f}, "
              f"max {max(busy) * 1000:.1f} ms, {len(busy)} lookups)")


def service_export_stall(directory: str, rows: int, dim: int) -> None:
    from kvstore_client import KVStoreClient

    from bench.services import KvstoreServer

    server = KvstoreServer(directory)
    try:
        with KVStoreClient(server.address, timeout=600) as client:
            client.create_table("a", dim, cache={"rows": 4096})
            hot = np.arange(512)
            client.update("a", hot, np.ones((512, dim), np.float32))
            client.create_table("b", dim, cache={"rows": 1 << (rows * 2 - 1).bit_length(), "flush_seconds": 3600.0})
            for start in range(0, rows, 65536):
                ids = np.arange(start, min(rows, start + 65536))
                client.update("b", ids, np.ones((len(ids), dim), np.float32))
            out = f"{directory}/export-b"

            def export() -> int:
                subprocess.run([sys.executable, "-m", "kvstore_client", "--address", server.address, "--quiet",
                                "export", "b", out], check=True, stdout=subprocess.DEVNULL)
                return rows
            idle, busy, _ = during(export, lambda: client.lookup("a", hot))
    finally:
        server.stop()
    print(f"service: lookup of table a while `kvstore export` exports table b ({rows} dirty rows): p99 idle "
          f"{percentile(idle, 99):.2f} ms, during {percentile(busy, 99):.2f} ms "
          f"(ratio {percentile(busy, 99) / percentile(idle, 99):.2f}, max {max(busy) * 1000:.1f} ms, "
          f"{len(busy)} lookups)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--only", choices=("snapshot", "export", "service"), default=None, help="run one part")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval in seconds (how soon a thread waiting for the GIL gets it)")
    args = parser.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    print(f"GIL switch interval {sys.getswitchinterval() * 1e3:.2f} ms")
    parts = {"snapshot": [lambda d: snapshot_stall(d, args.rows, args.dim, False),
                          lambda d: snapshot_stall(d, args.rows, args.dim, True)],
             "export": [lambda d: export_stall(d, args.rows, args.dim)],
             "service": [lambda d: service_export_stall(d, args.rows, args.dim)]}
    for run in parts[args.only] if args.only else [run for runs in parts.values() for run in runs]:
        directory = tempfile.mkdtemp(dir=args.dir)
        try:
            run(directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
