"""Lookup of cached rows through the server and client, beside a bare gRPC echo stream.

Both run the same process layout (server process, client in this process) and
move the same bytes: ids up in chunks, rows down in chunks of about 2 MiB. The
echo server answers each chunk with pre-built bytes of the right size, so it is
the transport's ceiling for this message pattern; it runs twice, as a threaded
and as an asyncio gRPC server, and the faster one is the reference. Prints rows/s
and the ratio. With `--baseline DIR` (a checkout of an earlier kvstore) that
version's server serves the same table in the same run, for a before/after; with
`--executor-too` this server also runs with `--inline-lookup-bytes 0` (every chunk
in a store thread, none on the event loop), for the gain of serving cached rows on the loop;
`--cpu` adds each server process's CPU time per call.

    python bench/grpc_bench.py [--rows 1000000] [--dim 128] [--baseline DIR] [--executor-too] [--cpu]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))       # run as a script: `bench` importable
from bench.echo import EchoClient, start_echo  # noqa: E402
from bench.report import python_env  # noqa: E402
from bench.services import compiled_loops_on_disk  # noqa: E402


def start(cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    compiled_loops_on_disk()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.strip().rsplit(" ", 1)[-1]
    raise RuntimeError(f"{cmd[0]} did not start")


def zipf_ids(rng, n: int, rows: int, perm: np.ndarray) -> np.ndarray:
    ranks = np.arange(1, rows + 1, dtype=np.float64)
    p = ranks ** -1.05
    p /= p.sum()
    return perm[rng.choice(rows, size=n, p=p)]


def _stat_seconds(path: str) -> float:
    """CPU seconds (user + system) in a /proc `stat` file (a process's or one thread's)."""
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc (Linux)."""
    return _stat_seconds(f"/proc/{pid}/stat")


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per kind of thread of a process so far, from /proc (Linux): by the name the
    OS shows (kvstore's threads name themselves), numbered pool threads summed under their
    pool's name, the main thread (the server's event loop) as "main"."""
    per_kind: dict[str, float] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            seconds = _stat_seconds(f"/proc/{pid}/task/{task}/stat")
            with open(f"/proc/{pid}/task/{task}/comm") as comm:
                name = comm.read().strip()
        except OSError:                        # the thread ended between the listing and the read
            continue
        kind = "main" if int(task) == pid else re.sub(r"_\d+$", "", name)
        per_kind[kind] = per_kind.get(kind, 0.0) + seconds
    return per_kind


def id_batches(rng, dist: str, batch: int, rows: int, perm: np.ndarray, seconds: float) -> list[np.ndarray]:
    """Batches of `batch` ids ("uniform" or "zipf" over `rows`), about `seconds` of work at 2 M ids/s."""
    count = max(3, int(seconds * 2e6 / batch))
    return [rng.integers(0, rows, batch) if dist == "uniform" else zipf_ids(rng, batch, rows, perm)
            for _ in range(count)]


def timed_side_by_side(lookups: dict, batches: list, rounds: int, pids: dict[str, int] | None = None,
                       block: int = 1) -> tuple[dict[str, float], dict[str, float]]:
    """Rows/s of each lookup over the same batches, taken in rotating order, so a noisy neighbour
    on a shared machine slows every contender alike instead of one window of one; with `pids`,
    also each server's CPU milliseconds per call. `block`: batches a contender runs in a row
    before the next one's turn (1: strict alternation, which leaves each contender idle between
    its calls; a GPU then starts every call from idle clocks)."""
    for lookup in lookups.values():
        lookup(batches[0])                    # warm-up
    names = list(lookups)
    timed = batches[1:]
    groups = [timed[i:i + block] for i in range(0, len(timed), block)]
    seconds, cpu = dict.fromkeys(names, 0.0), dict.fromkeys(pids or (), 0.0)
    for round_ in range(rounds):
        for index, group in enumerate(groups):
            shift = (index + round_) % len(names)
            for name in names[shift:] + names[:shift]:
                used = process_seconds(pids[name]) if name in cpu else 0.0
                start = time.perf_counter()
                for batch in group:
                    lookups[name](batch)
                seconds[name] += time.perf_counter() - start
                if name in cpu:
                    cpu[name] += process_seconds(pids[name]) - used
    rows, calls = rounds * sum(len(b) for b in timed), rounds * len(timed)
    return {name: rows / seconds[name] for name in names}, {name: 1e3 * cpu[name] / calls for name in cpu}


def lookup_arguments(rows: int) -> argparse.ArgumentParser:
    """The options every lookup-beside-echo bench takes (this one, same_host_bench.py)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=rows)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--rounds", type=int, default=1, help="passes over each case's batches")
    parser.add_argument("--cpu", action="store_true", help="also print each server's CPU ms per call (Linux)")
    parser.add_argument("--chunk-bytes", type=int, default=2 << 20, help="the clients' message size (chunk_bytes)")
    return parser


def main() -> None:
    parser = lookup_arguments(rows=1_000_000)
    parser.add_argument("--baseline", default="", help="checkout of an earlier kvstore to serve beside this one")
    parser.add_argument("--executor-too", action="store_true",
                        help="also serve with --inline-lookup-bytes 0 (every chunk in a store thread), as 'executor'")
    args = parser.parse_args()
    server = [sys.executable, "-m", "kvstore_server", "--port", "0", "--data-dir"]     # the pid is the server's
    servers = {"kvstore": start([*server, tempfile.mkdtemp(prefix="kvbench-")])}
    if args.executor_too:
        servers["executor"] = start([*server, tempfile.mkdtemp(prefix="kvbench-x-"), "--inline-lookup-bytes", "0"])
    if args.baseline:
        env = python_env(args.baseline)
        servers["baseline"] = start([sys.executable, "-m", "kvstore_server", "--data-dir",
                                     tempfile.mkdtemp(prefix="kvbench-base-"), "--port", "0"], env)
    servers["echo threaded"] = start_echo()
    servers["echo asyncio"] = start_echo(asyncio_server=True)
    try:
        run(args, {name: address for name, (_, address) in servers.items()},
            {name: proc.pid for name, (proc, _) in servers.items()} if args.cpu else None)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)


def run(args, addresses: dict[str, str], pids: dict[str, int] | None) -> None:
    from kvstore_client import KVStoreClient

    lookups = {}
    served = [name for name in ("kvstore", "executor", "baseline") if name in addresses]
    clients = [KVStoreClient(addresses[name], timeout=600, chunk_bytes=args.chunk_bytes) for name in served]
    for name, client in zip(served, clients, strict=True):
        load(client, args.rows, args.dim, name)
        lookups[name] = lambda b, client=client: client.lookup("bench", b)
    for name in ("echo threaded", "echo asyncio"):      # the same chunks up, the same bytes down
        echo = EchoClient(addresses[name], clients[0].chunk_bytes)
        lookups[name] = lambda b, echo=echo: echo.lookup(b, args.dim)
    rng = np.random.default_rng(1)
    perm = rng.permutation(args.rows)
    names = list(lookups)
    print(f"{'ids':8} {'batch':>7} " + " ".join(f"{n + ' rows/s':>22}" for n in names)
          + f" {'ratio':>6}" + (f" {'vs baseline':>11}" if "baseline" in lookups else "")
          + (f" {'vs executor':>11}" if "executor" in lookups else ""))
    for dist in ("uniform", "zipf"):
        for batch in (4096, 65536):
            batches = id_batches(rng, dist, batch, args.rows, perm, args.seconds)
            rates, cpu = timed_side_by_side(lookups, batches, args.rounds, pids)
            ratio = rates["kvstore"] / max(rates["echo threaded"], rates["echo asyncio"])
            line = f"{dist:8} {batch:>7} " + " ".join(f"{rates[n]:>22,.0f}" for n in names) + f" {ratio:>6.2f}"
            for other in ("baseline", "executor"):
                if other in rates:
                    line += f" {rates['kvstore'] / rates[other]:>11.2f}"
            print(line, flush=True)
            if cpu:
                print(f"{'':8} {'':>7} " + " ".join(f"{f'{cpu[n]:.2f} ms CPU/call':>22}" for n in names), flush=True)
    stats = clients[0].stats("bench")
    print(f"cache hits {stats.get('cache_hits', 0):,.0f} misses {stats.get('cache_misses', 0):,.0f}")
    for client in clients:
        client.close()


def load(client, rows: int, dim: int, name: str) -> None:
    """The bench table: `rows` rows of `dim` float32, every one cached (cache load 0.5). With 32
    ways a few sets get more rows than ways (262,144 rows in 2^19 slots: about 18); those rows
    spill into the next set (kvstore/cache.py), so no lookup goes to the store threads for a row
    (the benches print the table's hits and misses)."""
    cache_rows = -(-rows * 2 // 32) * 32     # load 0.5
    client.create_table("bench", dim=dim, cache={"rows": cache_rows})
    ids = np.arange(rows, dtype=np.int64)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for s in range(0, rows, 262144):
        client.update("bench", ids[s:s + 262144], rng.standard_normal((len(ids[s:s + 262144]), dim),
                                                                     dtype=np.float32))
    print(f"{name}: loaded {rows} rows in {time.perf_counter() - t0:.1f}s", flush=True)
    settle(client)


def settle(client, poll: float = 0.2) -> None:
    """Wait until the loaded rows are flushed: a server still writing them back spends CPU (and
    takes its table lock) during the first timed batches, which would bias whichever loaded last."""
    while True:
        stats = client.stats("bench")
        if not stats.get("cache_dirty_rows", 0) and not stats.get("pending_rows", 0):
            return
        time.sleep(poll)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
