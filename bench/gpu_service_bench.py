"""The GPU tier through the service: lookups of cached rows from a GPU table, a host table and a
bare gRPC stream of the same bytes, side by side in one run; then a 95%-hit run over three tiers.

1. One server holds two tables with the same rows, one cached in host memory and one in GPU
   memory; the client looks up the same batches from both and from the faster of two echo
   servers (the transport's ceiling). Prints rows/s and GPU / host (target >= 0.9: the device
   adds no bottleneck) and GPU / echo, twice: with the contenders alternating call by call (each
   GPU call then starts from an idle device) and taking turns of `--block` calls (steady traffic).
2. Three tiers: a table of `--rows` rows with a GPU tier of a quarter of them over a host tier of
   another quarter over RocksDB, Zipf lookups, beside a host table whose one tier has the same
   total slots. Prints rows/s of each and where the rows came from (GPU hits, host-tier reads,
   RocksDB reads).

    python bench/gpu_service_bench.py [--rows 1000000] [--dim 128] [--seconds 3] [--block 10]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))       # run as a script: `bench` importable
from bench.echo import EchoClient, start_echo  # noqa: E402
from bench.grpc_bench import start, timed_side_by_side, zipf_ids  # noqa: E402


def load(client, name: str, rows: int, dim: int, cache: dict) -> None:
    client.create_table(name, dim=dim, cache=cache)
    rng = np.random.default_rng(0)
    for s in range(0, rows, 262144):
        ids = np.arange(s, min(rows, s + 262144), dtype=np.int64)
        client.update(name, ids, rng.standard_normal((len(ids), dim), dtype=np.float32))


def cached_lookups(client, addresses: dict[str, str], args) -> None:
    slots = -(-args.rows * 2 // 32) * 32                 # load 0.5: every row cached (full sets spill)
    load(client, "host", args.rows, args.dim, {"rows": slots})
    load(client, "gpu", args.rows, args.dim, {"rows": slots, "device": "cuda:0"})
    lookups = {"gpu table": lambda b: client.lookup("gpu", b), "host table": lambda b: client.lookup("host", b)}
    for name in ("echo threaded", "echo asyncio"):
        echo = EchoClient(addresses[name], client.chunk_bytes)
        lookups[name] = lambda b, echo=echo: echo.lookup(b, args.dim)
    rng = np.random.default_rng(1)
    for batch in (4096, 65536):
        batches = [rng.integers(0, args.rows, batch) for _ in range(max(3, int(args.seconds * 2e6 / batch)))]
        for block in (1, args.block):
            rates, _ = timed_side_by_side(lookups, batches, 1, block=block)
            echo = max(rates["echo threaded"], rates["echo asyncio"])
            gpu, host = rates["gpu table"], rates["host table"]
            turns = "alternating calls" if block == 1 else f"turns of {block} calls"
            print(f"cached lookups, batch {batch:>6}, {turns:>17}: gpu {gpu:>12,.0f} rows/s, host {host:>12,.0f}, "
                  f"echo {echo:>12,.0f}; gpu/host {gpu / host:.2f}, gpu/echo {gpu / echo:.2f}, "
                  f"host/echo {host / echo:.2f}", flush=True)
    np.testing.assert_array_equal(client.lookup("gpu", batches[0]), client.lookup("host", batches[0]))


def three_tiers(client, args) -> None:
    quarter = -(-args.rows // 4 // 32) * 32
    load(client, "tiers", args.rows, args.dim, {"rows": quarter, "device": "cuda:0", "host_rows": quarter})
    load(client, "one", args.rows, args.dim, {"rows": 2 * quarter})
    rng = np.random.default_rng(2)
    perm = rng.permutation(args.rows)
    batches = [zipf_ids(rng, 65536, args.rows, perm) for _ in range(max(4, int(args.seconds * 2e6 / 65536)))]
    for batch in batches[:3]:                               # warm the tiers
        client.lookup("tiers", batch)
        client.lookup("one", batch)
    before = {name: client.stats(name) for name in ("tiers", "one")}
    rates, _ = timed_side_by_side({"tiers": lambda b: client.lookup("tiers", b),
                                "one": lambda b: client.lookup("one", b)}, batches, 1)
    after = {name: client.stats(name) for name in ("tiers", "one")}

    def moved(name: str, key: str) -> float:
        return after[name].get(key, 0.0) - before[name].get(key, 0.0)
    total = moved("tiers", "cache_hits") + moved("tiers", "cache_misses")
    from_host = moved("tiers", "host_tier_reads")
    from_rocks = moved("tiers", "rows_read") - from_host
    one_hits = moved("one", "cache_hits") / max(1.0, moved("one", "cache_hits") + moved("one", "cache_misses"))
    print(f"three tiers (GPU {quarter} + host {quarter} slots) over {args.rows} rows, Zipf 65536: "
          f"{rates['tiers']:,.0f} rows/s; from the GPU tier {moved('tiers', 'cache_hits') / total:.1%}, host tier "
          f"{from_host / total:.1%}, RocksDB {from_rocks:,.0f} rows; one host tier of {2 * quarter} slots: "
          f"{rates['one']:,.0f} rows/s ({one_hits:.1%} hits)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--block", type=int, default=10,
                        help="calls each contender makes in a row in the second measurement (default 10): "
                             "steady traffic, where strict alternation leaves the GPU idle between its calls")
    args = parser.parse_args()
    data_dir = tempfile.mkdtemp(prefix="kvbench-")
    servers = {"kvstore": start([sys.executable, "-m", "kvstore_server", "--data-dir", data_dir, "--port", "0"]),
               "echo threaded": start_echo(), "echo asyncio": start_echo(asyncio_server=True)}
    from kvstore_client import KVStoreClient

    try:
        client = KVStoreClient(servers["kvstore"][1], timeout=600)
        cached_lookups(client, {name: address for name, (_, address) in servers.items()}, args)
        three_tiers(client, args)
        client.close()
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
