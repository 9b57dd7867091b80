"""Server memory of one large Update: the peak RSS a streamed write of N MiB adds, beside the
same update made in-process on a `kvstore.Store` (the peer: no gRPC, the rows already in one
array), each as a ratio to the payload (1.0 would be the payload held once, nothing more).

    python -m bench.update_memory --mib 256 [--dim 128]

Each side runs in a fresh process (write_through table, host cache of 4096 slots; the server
with a request memory budget above the payload) and reads its VmHWM (peak resident set)
before and after the call. Linux only (/proc).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .echo import python_env, start_process
from .services import stop_process


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the highest resident set the process has had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(mib: int, dim: int) -> dict:
    from kvstore_client import KVStoreClient

    rows = (mib << 20) // (dim * 4)
    budget = str(4 * (mib << 20))
    with tempfile.TemporaryDirectory(prefix="kvstore-update-memory-") as data_dir:
        proc, address = start_process([sys.executable, "-m", "kvstore_server", "--data-dir", data_dir,
                                       "--port", "0", "--max-request-rows", str(rows + 1),
                                       "--max-buffered-bytes", budget, "--max-buffered-bytes-per-peer", budget])
        try:
            weights = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
            with KVStoreClient(address, timeout=600) as client:
                client.create_table("t", dim, cache={"rows": 4096, "write": "write_through"})
                client.update("t", np.arange(8), weights[:8])         # warm: imports, first table use
                before = peak_rss_bytes(proc.pid)
                client.update("t", np.arange(rows), weights)
                after = peak_rss_bytes(proc.pid)
        finally:
            stop_process(proc)
    payload = rows * dim * 4
    return {"payload_mib": payload / 2**20, "peak_before_mib": before / 2**20, "peak_after_mib": after / 2**20,
            "growth_mib": (after - before) / 2**20, "growth_per_payload": (after - before) / payload}


def measure_store(mib: int, dim: int) -> float:
    """In this process: peak RSS growth of `Store.update` over the payload, the rows already in memory."""
    from kvstore import Store, TableConfig

    rows = (mib << 20) // (dim * 4)
    with tempfile.TemporaryDirectory(prefix="kvstore-update-memory-") as data_dir, Store(data_dir) as store:
        store.create_table(TableConfig.from_dict({"name": "t", "dim": dim,
                                                  "cache": {"rows": 4096, "write": "write_through"}}))
        weights = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
        store.update("t", np.arange(8), weights[:8])
        before = peak_rss_bytes(os.getpid())
        store.update("t", np.arange(rows), weights)
        return (peak_rss_bytes(os.getpid()) - before) / (rows * dim * 4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="payload of the update (weights only)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--store-only", action="store_true", help=argparse.SUPPRESS)   # the peer's process
    args = parser.parse_args(argv)
    if args.store_only:
        print(measure_store(args.mib, args.dim))
        return
    figures = measure(args.mib, args.dim)
    store = float(subprocess.run([sys.executable, "-m", "bench.update_memory", "--store-only", "--mib",
                                  str(args.mib), "--dim", str(args.dim)], capture_output=True, text=True,
                                 check=True, env=python_env()).stdout.split()[-1])
    print("update of {payload_mib:.0f} MiB: server peak RSS {peak_before_mib:.0f} -> {peak_after_mib:.0f} MiB, "
          "growth {growth_mib:.0f} MiB = {growth_per_payload:.2f}x the payload".format(**figures))
    server = figures["growth_per_payload"]
    print(f"in-process Store.update (peer): {store:.2f}x the payload; server / peer = {server / store:.2f}; "
          f"the server's own share {server - store:.2f}x")


if __name__ == "__main__":
    main()
