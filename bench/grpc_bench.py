"""Lookup of cached rows through the server and client, beside a bare gRPC echo stream.

Both run the same process layout (server process, client in this process) and
move the same bytes: ids up in chunks, rows down in chunks of about 2 MiB. The
echo server answers each chunk with pre-built bytes of the right size, so it is
the transport's ceiling for this message pattern. Prints rows/s and the ratio.

    python bench/grpc_bench.py [--rows 1000000] [--dim 128]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))       # run as a script: `bench` importable
from bench.echo import EchoClient, start_echo, start_process  # noqa: E402
from bench.services import stop_process  # noqa: E402


def zipf_ids(rng, n: int, rows: int, perm: np.ndarray) -> np.ndarray:
    ranks = np.arange(1, rows + 1, dtype=np.float64)
    p = ranks ** -1.05
    p /= p.sum()
    return perm[rng.choice(rows, size=n, p=p)]


def timed(fn, batches) -> float:
    fn(batches[0])                       # warm-up
    start = time.perf_counter()
    for batch in batches[1:]:
        fn(batch)
    return sum(len(b) for b in batches[1:]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()

    from kvstore_client import KVStoreClient

    data_dir = tempfile.mkdtemp(prefix="kvbench-")
    server, address = start_process([sys.executable, "-m", "kvstore_server", "--data-dir", data_dir, "--port", "0"])
    echo, echo_address = start_echo()
    try:
        client = KVStoreClient(address, timeout=600)
        cache_rows = -(-args.rows * 2 // 32) * 32     # load 0.5: every row finds a way in its set
        client.create_table("bench", dim=args.dim, cache={"rows": cache_rows})
        ids = np.arange(args.rows, dtype=np.int64)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for s in range(0, args.rows, 262144):
            client.update("bench", ids[s:s + 262144], rng.standard_normal((len(ids[s:s + 262144]), args.dim),
                                                                         dtype=np.float32))
        print(f"loaded {args.rows} rows in {time.perf_counter() - t0:.1f}s", flush=True)

        echo_client = EchoClient(echo_address, client.chunk_bytes)

        def echo_lookup(batch: np.ndarray) -> np.ndarray:
            return echo_client.lookup(batch, args.dim)

        perm = rng.permutation(args.rows)
        print(f"{'ids':8} {'batch':>7} {'kvstore rows/s':>15} {'echo rows/s':>13} {'ratio':>6}")
        for dist in ("uniform", "zipf"):
            for batch in (4096, 65536):
                count = max(3, int(args.seconds * 2e6 / batch))
                batches = [rng.integers(0, args.rows, batch) if dist == "uniform" else zipf_ids(rng, batch, args.rows,
                                                                                                  perm)
                           for _ in range(count)]
                kv = timed(lambda b: client.lookup("bench", b), batches)
                ref = timed(echo_lookup, batches)
                print(f"{dist:8} {batch:>7} {kv:>15,.0f} {ref:>13,.0f} {kv / ref:>6.2f}", flush=True)
        stats = client.stats("bench")
        print(f"cache hits {stats.get('cache_hits', 0):,.0f} misses {stats.get('cache_misses', 0):,.0f}")
        client.close()
    finally:
        for proc in (server, echo):
            stop_process(proc)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
