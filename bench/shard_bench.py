"""Lookups and training steps through 1, 2, 4, ... local shards (`kvstore-server --shards N`).

For each shard count: one `kvstore-server --shards N` (N processes, N cores at
most), a table of `--rows` rows of dim `--dim` loaded and cached on every shard
(cache load 0.5), then from this process through one ShardedClient:
- lookup rows/s (Zipf ids, batch `--batch`), and the ratio to 1 shard in the same run;
- training steps/s (lookup + apply_gradients, rowwise Adagrad), and the ratio to 1 shard;
- this (client) process's CPU time per lookup and per step: the client is the first limit;
- with `--clients K` (K > 1), the same lookups and steps from K client processes at once, each
  with its own ShardedClient, started together at a barrier: what the shards serve when one
  client process is not the limit (a trainer fleet, many inference replicas);
- the cost of the client's split and reassembly alone (no RPC: the same numpy work a
  sharded lookup does around its calls) against one lookup of the batch on one shard through a
  plain KVStoreClient; with 1 shard, the ShardedClient against that plain client (no split).
The target on a host with cores to spare is 4 shards >= 3x one shard; on a host with
fewer cores than shards + 1, the shards and the client share cores and say so.

    python bench/shard_bench.py [--shards 1,2,4,8] [--rows 400000] [--dim 128] [--batch 65536] [--clients 4]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from grpc_bench import zipf_ids  # Zipf(1.05) ids, as the other lookup benchmarks draw them


def start(shards: int, data_dir: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "kvstore_server", "--shards", str(shards), "--data-dir", data_dir,
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.strip().rsplit(" ", 1)[-1]
    raise RuntimeError("kvstore-server --shards did not start")


def timed(fn, batches) -> tuple[float, float]:
    """Seconds per batch, and this (client) process's CPU seconds per batch, after one warm-up batch."""
    fn(batches[0])
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches[1:]:
        fn(batch)
    return (time.perf_counter() - start) / (len(batches) - 1), (time.process_time() - cpu) / (len(batches) - 1)


def paired(sharded, plain, batches) -> tuple[float, float]:
    """Seconds per batch of two ways to make the same call, alternating batch by batch and which goes
    first (so drifts in the machine's load, and whatever the first call warms, favour neither)."""
    spent = [0.0, 0.0]
    for number, batch in enumerate(batches):
        order = [(0, sharded), (1, plain)]
        for index, call in order if number % 2 else order[::-1]:
            start = time.perf_counter()
            call(batch)
            spent[index] += time.perf_counter() - start
    return spent[0] / len(batches), spent[1] / len(batches)


def split_and_gather(client, batch: np.ndarray, dim: int, answers: dict[int, np.ndarray]) -> None:
    """What a sharded lookup does besides its RPCs: split the ids by shard, copy each shard's
    answer (here a ready array, as the received bytes are) once, to its rows' places."""
    from kvstore_client.reassembly import Reassembly

    parts = client._split(batch)
    result = Reassembly(len(batch))
    for i, at in parts.items():
        result.sink(at)(0, len(at), answers[i][:len(at)], None)


def client_process(address: str, batch: int, dim: int, batches: list[np.ndarray], start, answers) -> None:
    """One of `--clients` processes: lookups, then steps, each phase begun at the shared barrier."""
    from kvstore_client import KVStoreClient

    with KVStoreClient(address.split(","), timeout=600) as client:
        grads = np.full((batch, dim), 1e-3, np.float32)
        for phase in (lambda b: client.lookup("bench", b),
                      lambda b: (client.lookup("bench", b), client.apply_gradients("bench", b, grads))):
            phase(batches[0])
            start.wait()
            began = time.perf_counter()
            for ids in batches[1:]:
                phase(ids)
            answers.put(time.perf_counter() - began)


def many_clients(count: int, address: str, args, batches: list[np.ndarray]) -> tuple[float, float]:
    """Lookup rows/s and steps/s of `count` client processes together: all calls over the slowest
    process's time (each phase starts for all at one barrier)."""
    context = multiprocessing.get_context("spawn")
    start, answers = context.Barrier(count), context.Queue()
    procs = [context.Process(target=client_process,
                             args=(address, args.batch, args.dim, batches[i::count] if len(batches) >= 2 * count
                                   else batches, start, answers)) for i in range(count)]
    for proc in procs:
        proc.start()
    phases = [[answers.get(timeout=1800) for _ in range(count)] for _ in range(2)]
    for proc in procs:
        proc.join()
    calls = sum(len(batches[i::count] if len(batches) >= 2 * count else batches) - 1 for i in range(count))
    return calls * args.batch / max(phases[0]), calls / max(phases[1])


def measure(shards: int, args, batches: list[np.ndarray]) -> dict[str, float]:
    from kvstore_client import KVStoreClient

    data_dir = tempfile.mkdtemp(prefix="kvshard-bench-")
    server, address = start(shards, data_dir)
    try:
        with KVStoreClient(address.split(","), timeout=600) as client:
            cache_rows = -(-args.rows * 2 // shards // 32) * 32          # load 0.5 on every shard
            client.create_table("bench", args.dim, cache={"rows": cache_rows},
                                optimizer={"name": "rowwise_adagrad", "lr": 0.01})
            ids = np.arange(args.rows, dtype=np.int64)
            for s in range(0, args.rows, 131072):
                client.lookup("bench", ids[s:s + 131072])                # initialize and cache every row
            grads = np.full((args.batch, args.dim), 1e-3, np.float32)
            lookup, lookup_cpu = timed(lambda b: client.lookup("bench", b), batches)
            step, step_cpu = timed(lambda b: (client.lookup("bench", b), client.apply_gradients("bench", b, grads)),
                                   batches)
            answers = {i: np.ones((args.batch, args.dim), np.float32) for i in range(shards)}
            split = timed(lambda b: split_and_gather(client, b, args.dim, answers), batches)[0] if shards > 1 else 0.0
            single = paired(lambda b: client.lookup("bench", b), lambda b: client.shards[0].lookup("bench", b),
                            batches) if shards == 1 else None
            fleet = many_clients(args.clients, address, args, batches) if args.clients > 1 else None
    finally:
        server.terminate()
        server.wait(timeout=120)
    return {"lookup": args.batch / lookup, "steps": 1 / step, "split": split, "single": single,
            "lookup_cpu": lookup_cpu, "step_cpu": step_cpu, "fleet": fleet}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", default="1,2", help="comma-separated shard counts (default 1,2)")
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--clients", type=int, default=1,
                        help="also measure K client processes at once (default 1: only the one client)")
    args = parser.parse_args()
    counts = [int(c) for c in args.shards.split(",")]
    rng = np.random.default_rng(0)
    perm = rng.permutation(args.rows)
    batches = [zipf_ids(rng, args.batch, args.rows, perm) for _ in range(args.batches)]
    print(f"host: {os.cpu_count()} cores; {args.rows:,} rows of dim {args.dim}; batch {args.batch:,} Zipf ids")
    results = {}
    for shards in counts:
        results[shards] = measure(shards, args, batches)
        if shards + 1 > (os.cpu_count() or 1):
            print(f"  ({shards} shards + the client on {os.cpu_count()} cores: they share cores)")
    base = results[counts[0]]
    print(f"{'shards':>6} {'lookup rows/s':>14} {'x':>5} {'steps/s':>8} {'x':>5} {'split+gather ms':>16} "
          f"{'client cpu ms/lookup':>21} {'client cpu ms/step':>19}")
    for shards, r in results.items():
        print(f"{shards:>6} {r['lookup']:>14,.0f} {r['lookup'] / base['lookup']:>5.2f} {r['steps']:>8.2f} "
              f"{r['steps'] / base['steps']:>5.2f} {1000 * r['split']:>16.2f} {1000 * r['lookup_cpu']:>21.1f} "
              f"{1000 * r['step_cpu']:>19.1f}")
    if args.clients > 1:
        print(f"{args.clients} client processes at once:")
        print(f"{'shards':>6} {'lookup rows/s':>14} {'x':>5} {'steps/s':>8} {'x':>5}")
        for shards, r in results.items():
            (rows, steps), (base_rows, base_steps) = r["fleet"], base["fleet"]
            print(f"{shards:>6} {rows:>14,.0f} {rows / base_rows:>5.2f} {steps:>8.2f} {steps / base_steps:>5.2f}")
    if 1 in results:
        sharded, single = results[1]["single"]
        print(f"one lookup of {args.batch:,} ids on one shard through KVStoreClient: {1000 * single:.1f} ms; "
              f"through a 1-shard ShardedClient (no split), batch by batch beside it: {1000 * sharded:.1f} ms "
              f"(ratio {single / sharded:.2f})")
        for shards in (s for s in counts if s > 1):
            print(f"split + reassembly for {shards} shards: {results[shards]['split'] / single:.1%} of the one-shard "
                  "lookup")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
