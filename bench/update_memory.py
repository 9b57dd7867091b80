"""Server memory of one large Update: the peak RSS a streamed write of N MiB adds, and its
ratio to the payload (the limit: 1.0, the payload itself buffered once).

    python -m bench.update_memory --mib 256 [--dim 128]

Starts a fresh `kvstore-server` (write_through table, host cache of 4096 slots, a request
memory budget above the payload), reads its VmHWM (peak resident set) before and after the
call, and prints the growth beside the payload. Linux only (/proc).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from .echo import start_process
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="payload of the update (weights only)")
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args(argv)
    figures = measure(args.mib, args.dim)
    print("update of {payload_mib:.0f} MiB: server peak RSS {peak_before_mib:.0f} -> {peak_after_mib:.0f} MiB, "
          "growth {growth_mib:.0f} MiB = {growth_per_payload:.2f}x the payload (limit 1.00x)".format(**figures))


if __name__ == "__main__":
    main()
