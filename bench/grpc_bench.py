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
import subprocess
import sys
import tempfile
import time
from concurrent import futures

import grpc
import numpy as np

ECHO_METHOD = "/bench.Echo/Rows"
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.so_reuseport", 0)]


def echo_server(row_bytes: int) -> None:
    """A bidi stream that answers n ids (8 n bytes) with n rows of zeros."""
    blob = bytes(row_bytes * 65536)

    def rows(request_iterator, context):
        for request in request_iterator:
            yield blob[: (len(request) // 8) * row_bytes]

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Rows": grpc.stream_stream_rpc_method_handler(rows, request_deserializer=None, response_serializer=None),
    })
    server = grpc.server(futures.ThreadPoolExecutor(8), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.strip().rsplit(" ", 1)[-1]
    raise RuntimeError(f"{cmd[0]} did not start")


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
    parser.add_argument("--echo-server", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()
    if args.echo_server:
        return echo_server(args.echo_server)

    from kvstore_client import KVStoreClient

    row_bytes = args.dim * 4
    data_dir = tempfile.mkdtemp(prefix="kvbench-")
    server, address = start(["kvstore-server", "--data-dir", data_dir, "--port", "0"])
    echo, echo_address = start([sys.executable, __file__, "--echo-server", str(row_bytes)])
    try:
        client = KVStoreClient(address, timeout=600)
        cache_rows = -(-args.rows * 5 // 4 // 32) * 32
        client.create_table("bench", dim=args.dim, cache={"rows": cache_rows})
        ids = np.arange(args.rows, dtype=np.int64)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for s in range(0, args.rows, 262144):
            client.update("bench", ids[s:s + 262144], rng.standard_normal((len(ids[s:s + 262144]), args.dim),
                                                                         dtype=np.float32))
        print(f"loaded {args.rows} rows in {time.perf_counter() - t0:.1f}s", flush=True)

        channel = grpc.insecure_channel(echo_address, options=GRPC_OPTIONS)
        echo_call = channel.stream_stream(ECHO_METHOD)
        chunk_rows = max(1, client.chunk_bytes // row_bytes)

        def echo_lookup(batch: np.ndarray) -> np.ndarray:
            out = np.empty((len(batch), args.dim), np.float32)
            reqs = (batch[i:i + chunk_rows].tobytes() for i in range(0, len(batch), chunk_rows))
            pos = 0
            for blob in echo_call(reqs):
                part = np.frombuffer(blob, np.float32).reshape(-1, args.dim)
                out[pos:pos + len(part)] = part
                pos += len(part)
            return out

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
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
