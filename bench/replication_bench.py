"""Replication and delta checkpoints: replica apply rate, steady-state lag, delta vs full export.

    python bench/replication_bench.py [--rows 200000] [--dim 32] [--rate 20000] [--seconds 20]

Starts a primary and a replica (`--replica-of`) as separate server processes on
loopback, then measures, each beside its peer in the same run:

1. apply rate: `--rows` unique rows are written to the primary with Update
   batches as fast as one client can; the replica's rows/s (from the write's
   start until its applied sequence equals the primary's) is printed beside the
   primary's own write rate, and their ratio.
2. steady-state lag: a writer sends Zipf-distributed updates at `--rate` rows/s
   for `--seconds`; the replica's `kvstore_replica_lag_seconds` and lag in
   sequences are sampled twice a second (median, p95, max), beside the
   coalescing interval they are bounded by.
   Then the replica is stopped, `--rows` more rows written, and the replica started
   again: it resumes and applies them as one backlog (rows/s including its start-up).
3. delta export: after 1% of the rows changed, a delta export (`since_sequence`)
   against a full export of the same table: rows, bytes on the wire, seconds, ratios.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
from kvstore_client import KVStoreClient
from prometheus_client.parser import text_string_to_metric_families

BATCH = 8192


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, data_dir: str, *args: str):
        self.metrics_port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore_server", "--data-dir", data_dir, "--port", "0",
             "--metrics-port", str(self.metrics_port), *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"server did not start: {line!r}")
        self.address = line.rsplit(" ", 1)[1].strip()

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == name)          # summed over label sets

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def wait_caught_up(primary: Server, replica: Server, timeout: float = 600.0) -> float:
    """Seconds until the replica has applied everything the primary recorded."""
    target = primary.metric("kvstore_changefeed_sequence")
    start = time.perf_counter()
    while replica.metric("kvstore_replica_applied_sequence") < target:
        if time.perf_counter() - start > timeout:
            raise RuntimeError("the replica did not catch up")
        time.sleep(0.05)
    return time.perf_counter() - start


def write_rows(client: KVStoreClient, rows: int, dim: int, offset: int) -> float:
    """Update `rows` new rows (ids from `offset`) in batches; returns the seconds it took."""
    block = np.random.default_rng(0).standard_normal((BATCH, dim)).astype(np.float32)
    start = time.perf_counter()
    for lo in range(0, rows, BATCH):
        ids = np.arange(lo, min(rows, lo + BATCH), dtype=np.int64) + offset
        client.update("t", ids, block[: len(ids)])
    return time.perf_counter() - start


def apply_rate(client: KVStoreClient, primary: Server, replica: Server, rows: int, dim: int) -> None:
    written = write_rows(client, rows, dim, 10_000_000)
    lag = wait_caught_up(primary, replica)
    write_rate, apply = rows / written, rows / (written + lag)
    print(f"apply rate, following: primary Update {write_rate:,.0f} rows/s; replica applied {apply:,.0f} rows/s "
          f"(caught up {lag:.2f} s after the last write); replica/primary = {apply / write_rate:.2f}")


def backlog_rate(client: KVStoreClient, primary: Server, replica: Server, root: str, rows: int, dim: int) -> Server:
    """Stop the replica, write `rows` new rows, start it again: it resumes and applies them as one backlog
    (its start-up time counted too). Returns the restarted replica."""
    replica.stop()
    written = write_rows(client, rows, dim, 20_000_000)
    start = time.perf_counter()
    replica = Server(f"{root}/replica", "--replica-of", primary.address)
    took = time.perf_counter() - start + wait_caught_up(primary, replica)
    print(f"apply rate, backlog after a restart: primary Update {rows / written:,.0f} rows/s; replica start + "
          f"apply {rows / took:,.0f} rows/s ({took:.2f} s); replica/primary = {written / took:.2f}; "
          f"bootstraps after the restart: {replica.metric('kvstore_replica_bootstraps_total'):.0f}")
    return replica


def steady_lag(address: str, primary: Server, replica: Server, rows: int, dim: int, rate: float,
               seconds: float) -> None:
    stop = threading.Event()
    sent = [0]

    def write() -> None:
        rng = np.random.default_rng(1)
        block = rng.standard_normal((1024, dim)).astype(np.float32)
        with KVStoreClient(address) as writer:
            start = time.perf_counter()
            while not stop.is_set():
                ids = (rng.zipf(1.2, 1024) - 1) % rows
                writer.update("t", ids, block)
                sent[0] += len(ids)
                ahead = sent[0] / rate - (time.perf_counter() - start)
                if ahead > 0:
                    time.sleep(ahead)

    thread = threading.Thread(target=write)
    thread.start()
    lags, behind = [], []
    start = time.perf_counter()
    time.sleep(min(2.0, seconds / 4))                   # warm-up: the first batches
    while time.perf_counter() - start < seconds:
        lags.append(replica.metric("kvstore_replica_lag_seconds"))
        behind.append(replica.metric("kvstore_replica_lag_sequences"))
        time.sleep(0.5)
    stop.set()
    thread.join()
    achieved = sent[0] / (time.perf_counter() - start)
    lags.sort()
    print(f"steady lag at {achieved:,.0f} rows/s of Zipf updates (asked {rate:,.0f}): replica lag median "
          f"{statistics.median(lags):.3f} s, p95 {lags[int(0.95 * (len(lags) - 1))]:.3f} s, max {lags[-1]:.3f} s; "
          f"median {statistics.median(behind):.0f} sequences behind; coalescing interval 0.100 s "
          f"(median lag / interval = {statistics.median(lags) / 0.1:.1f})")
    wait_caught_up(primary, replica)


def delta_vs_full(client: KVStoreClient, rows: int, dim: int) -> None:
    def export(since):
        start = time.perf_counter()
        stream = client.export_sequenced("t", since)
        count, size = 0, 0
        for part in stream:
            count += len(part.ids)
            size += part.ids.nbytes + part.weights.nbytes + part.state.nbytes + part.meta.nbytes
            size += part.tombstones.nbytes
        return stream.sequence, count, size, time.perf_counter() - start

    sequence, full_rows, full_bytes, full_s = export(None)
    rng = np.random.default_rng(2)
    changed = 10_000_000 + rng.choice(rows, full_rows // 100, replace=False).astype(np.int64)
    client.update("t", changed, rng.standard_normal((len(changed), dim)).astype(np.float32))
    _, delta_rows, delta_bytes, delta_s = export(sequence)
    print(f"export after 1% of {full_rows:,} rows changed: full {full_bytes / 2**20:.1f} MiB in {full_s:.2f} s; "
          f"delta {delta_rows:,} rows, {delta_bytes / 2**20:.2f} MiB in {delta_s:.3f} s; "
          f"delta/full bytes = {delta_bytes / full_bytes:.4f}, time = {delta_s / full_s:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--rate", type=float, default=20_000.0, help="rows/s of the steady-lag writer")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="replication-bench-")
    primary = Server(f"{root}/primary")
    replica = None
    try:
        with KVStoreClient(primary.address, timeout=600.0) as client:
            client.create_table("t", args.dim, cache={"rows": 1 << 18, "ways": 32})
            replica = Server(f"{root}/replica", "--replica-of", primary.address)
            wait_caught_up(primary, replica)
            apply_rate(client, primary, replica, args.rows, args.dim)
            replica = backlog_rate(client, primary, replica, root, args.rows, args.dim)
            steady_lag(primary.address, primary, replica, args.rows, args.dim, args.rate, args.seconds)
            delta_vs_full(client, args.rows, args.dim)
    finally:
        for server in (replica, primary):
            if server is not None:
                server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
