"""Lookups of cached rows through the same-host path, beside the network path and a bare gRPC stream.

One kvstore server process serves one table (every row cached); in this process a
client with `same_host=True` (ids and rows through shared memory, gRPC carries the
headers) and one with `same_host=False` (the network path) look up the same batches,
beside the echo servers of bench/echo.py streaming the same bytes (ids up, rows down,
in the client's chunks): the transport's ceiling for the network path. Batches are
timed in rotating order (grpc_bench.timed_side_by_side). Prints rows/s and the ratios
shm / best echo (the issue's target: >= 2) and shm / network; then a training step (lookup and
apply_gradients, rowwise Adagrad, Zipf ids) through each path.

    python bench/same_host_bench.py [--rows 262144] [--dim 128] [--seconds 3] [--rounds 1] [--cpu]

`--cpu` adds each server process's CPU time per call (shm and network: the kvstore server's).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))       # run as a script: `bench` importable
from bench.echo import EchoClient, start_echo  # noqa: E402
from bench.grpc_bench import id_batches, load, lookup_arguments, start, timed_side_by_side  # noqa: E402


def main() -> None:
    args = lookup_arguments(rows=262_144).parse_args()
    servers = {"kvstore": start([sys.executable, "-m", "kvstore_server", "--port", "0", "--data-dir",
                                 tempfile.mkdtemp(prefix="kvbench-shm-")]),
               "echo threaded": start_echo(), "echo asyncio": start_echo(asyncio_server=True)}
    try:
        pids = {name: proc.pid for name, (proc, _) in servers.items()}
        run(args, {name: address for name, (_, address) in servers.items()},
            {"shm": pids["kvstore"], "network": pids["kvstore"], "echo threaded": pids["echo threaded"],
             "echo asyncio": pids["echo asyncio"]} if args.cpu else None)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)


def run(args, addresses: dict[str, str], pids: dict[str, int] | None) -> None:
    from kvstore_client import KVStoreClient

    shm = KVStoreClient(addresses["kvstore"], timeout=600, same_host=True)
    net = KVStoreClient(addresses["kvstore"], timeout=600, same_host=False)
    load(net, args.rows, args.dim, "kvstore")
    lookups = {"shm": lambda b: shm.lookup("bench", b), "network": lambda b: net.lookup("bench", b)}
    echoes = {name: EchoClient(addresses[name], net.chunk_bytes) for name in ("echo threaded", "echo asyncio")}
    for name, echo in echoes.items():
        lookups[name] = lambda b, echo=echo: echo.lookup(b, args.dim)
    rng = np.random.default_rng(1)
    perm = rng.permutation(args.rows)
    first = rng.integers(0, args.rows, 1000)
    if not np.array_equal(shm.lookup("bench", first), net.lookup("bench", first)):
        raise SystemExit("the shm and network paths disagree")
    names = list(lookups)
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores; dim {args.dim}, {args.rows:,} rows cached")
    print(f"{'ids':8} {'batch':>7} " + " ".join(f"{n + ' rows/s':>20}" for n in names)
          + f" {'shm/echo':>9} {'shm/net':>8} {'net/echo':>9}")
    for dist in ("uniform", "zipf"):
        for batch in (4096, 65536):
            batches = id_batches(rng, dist, batch, args.rows, perm, args.seconds)
            rates, cpu = timed_side_by_side(lookups, batches, args.rounds, pids)
            echo = max(rates["echo threaded"], rates["echo asyncio"])
            print(f"{dist:8} {batch:>7} " + " ".join(f"{rates[n]:>20,.0f}" for n in names)
                  + f" {rates['shm'] / echo:>9.2f} {rates['shm'] / rates['network']:>8.2f}"
                  + f" {rates['network'] / echo:>9.2f}", flush=True)
            if cpu:
                print(f"{'':8} {'':>7} " + " ".join(f"{f'{cpu[n]:.2f} ms CPU/call':>20}" for n in names), flush=True)
    training_steps(args, shm, net, rng, perm)
    stats = net.stats("bench")
    print(f"cache hits {stats.get('cache_hits', 0):,.0f} misses {stats.get('cache_misses', 0):,.0f}")
    for client in (shm, net, *echoes.values()):
        client.close()


def training_steps(args, shm, net, rng, perm) -> None:
    """A training step, lookup then apply_gradients (rowwise Adagrad, Zipf ids), through each path."""
    net.create_table("steps", dim=args.dim, optimizer={"name": "rowwise_adagrad", "lr": 0.01},
                     cache={"rows": -(-args.rows * 2 // 32) * 32})
    print(f"{'step':8} {'batch':>7} {'shm steps/s':>14} {'network steps/s':>16} {'shm/net':>8}")
    for batch in (4096, 65536):
        grads = np.full((batch, args.dim), 1e-3, np.float32)
        steps = {name: lambda b, client=client, grads=grads: (client.lookup("steps", b),
                                                              client.apply_gradients("steps", b, grads))
                 for name, client in (("shm", shm), ("network", net))}
        rates, _ = timed_side_by_side(steps, id_batches(rng, "zipf", batch, args.rows, perm, args.seconds / 4),
                                      args.rounds)
        print(f"{'zipf':8} {batch:>7} {rates['shm'] / batch:>14.1f} {rates['network'] / batch:>16.1f}"
              f" {rates['shm'] / rates['network']:>8.2f}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
