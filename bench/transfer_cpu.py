"""Wall time and CPU of `kvstore export` and `kvstore import` passes against one server.

    python bench/transfer_cpu.py [--rows 1000000] [--dim 128] [--reps 2] [--dir DIR]

Starts `python -m kvstore_server` on a data directory holding one table of `rows` rows (made by
import on the first run; pass the same --dir to reuse it), then runs the `kvstore export`
command `reps` times and `kvstore import` of that export into new tables `reps` times. Prints
MiB/s of ids and weights, the CPU seconds of the server with its worker processes (from /proc,
children included once reaped) and of the command, and the load average: the CPU figures are
what a loaded machine disturbs least.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from kvstore_client import KVStoreClient

from bench.services import KvstoreServer


def process_cpu(pid: int) -> float:
    """User + system seconds of a process and its reaped children."""
    with open(f"/proc/{pid}/stat") as src:
        fields = src.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


def load_table(client: KVStoreClient, rows: int, dim: int) -> None:
    if "exp" in client.list_tables():
        return
    weights = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    client.create_table("exp", dim, cache={"rows": 4096})
    for start in range(0, rows, 100_000):
        client.import_table("exp", np.arange(start, min(rows, start + 100_000)), weights[start:start + 100_000])


def timed_command(server: KvstoreServer, payload_mib: float, label: str, *args: str) -> None:
    server_cpu, command_cpu, began = process_cpu(server.proc.pid), children_cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "kvstore_client", "--address", server.address, "--quiet", *args],
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - began
    print(f"{label}: {payload_mib / wall:.0f} MiB/s ({wall:.2f} s), server+workers CPU "
          f"{process_cpu(server.proc.pid) - server_cpu:.2f} s, command CPU {children_cpu() - command_cpu:.2f} s, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dir", default=None, help="data directory (kept); default: a temporary one")
    args = parser.parse_args()
    data = args.dir or tempfile.mkdtemp()
    out = tempfile.mkdtemp()
    payload_mib = args.rows * (8 + args.dim * 4) / 2**20
    server = KvstoreServer(data)
    try:
        with KVStoreClient(server.address, timeout=600) as client:
            load_table(client, args.rows, args.dim)
            for rep in range(args.reps):
                shutil.rmtree(f"{out}/x{rep}", ignore_errors=True)
                timed_command(server, payload_mib, "export", "export", "exp", f"{out}/x{rep}")
            for rep in range(args.reps):
                if f"imp{rep}" in client.list_tables():
                    client.drop_table(f"imp{rep}")
                timed_command(server, payload_mib, "import", "import", f"imp{rep}", f"{out}/x0")
    finally:
        server.stop()
        shutil.rmtree(out, ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
