"""`mixed`: many clients at once, each a process doing lookups and gradient pushes (Zipf ids),
against kvstore-server and against Redis used as a parameter server (MGET; MGET + MSET with
the SGD step in the client), in alternating phases. Reports rows/s per method over the phase's
wall time and the latency of every call (the CDF plot draws these)."""
from __future__ import annotations

import multiprocessing
import time
from collections import defaultdict

import numpy as np

from .. import store_bench
from ..context import Context, cache_slots, table_weights
from ..harness import PEER, SUBJECT, Disagreement, Record, latency_summary
from ..services import KvstoreServer, RedisConnection
from .lookup_service import load_server
from .train import redis_step

TABLE = "mixed"
LR = 0.01


def client_ops(system: str, address: str, dim: int):
    """(lookup, apply_gradients) callables of one client process."""
    if system == "kvstore":
        from kvstore_client import KVStoreClient

        client = KVStoreClient(address, timeout=600)
        return (lambda ids: client.lookup(TABLE, ids, on_miss="error"),
                lambda ids, grads: client.apply_gradients(TABLE, ids, grads)), client
    redis = RedisConnection(int(address))
    return (lambda ids: redis.mget(ids, dim), lambda ids, grads: redis_step(redis, ids, grads, dim)), redis


def worker(system: str, address: str, plan: dict, seed: int, barrier, results) -> None:
    """One client: `ops` calls, a share of them lookups, the rest gradient pushes (evenly spread, so
    every client makes both kinds); reports the latency of each call."""
    rng = np.random.default_rng(seed)
    sampler = store_bench.IdSampler(plan["rows"], 1.05, seed=1)       # the same hot rows for every client
    sampler.rng = rng
    (lookup, push), conn = client_ops(system, address, plan["dim"])
    id_batches = sampler.batches("zipf", plan["batch"], plan["ops"])
    grads = rng.standard_normal((plan["batch"], plan["dim"]), dtype=np.float32) * 0.01
    period = round(1 / (1 - plan["lookup_share"]))           # every period-th call is a gradient push
    kinds = [i % period != period - 1 for i in range(plan["ops"])]
    barrier.wait()
    began = time.monotonic()
    calls = []
    for ids, is_lookup in zip(id_batches, kinds, strict=True):
        start = time.perf_counter()
        lookup(ids) if is_lookup else push(ids, grads)
        calls.append(("lookup" if is_lookup else "apply_gradients", time.perf_counter() - start))
    results.put((began, time.monotonic(), calls))
    conn.close()


def phase(system: str, address: str, plan: dict, rep: int) -> tuple[float, list]:
    """All clients at once, released together by a barrier; returns wall seconds and every call."""
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(plan["clients"]), spawn.Queue()
    procs = [spawn.Process(target=worker, args=(system, address, plan, 1000 * rep + i, barrier, results))
             for i in range(plan["clients"])]
    for proc in procs:
        proc.start()
    reports = [results.get(timeout=1800) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise RuntimeError(f"a {system} client exited with code {proc.exitcode}")
    wall = max(end for _, end, _ in reports) - min(begin for begin, _, _ in reports)
    return wall, [call for _, _, calls in reports for call in calls]


def run(ctx: Context) -> list[Record]:
    if ctx.quick:
        plan = {"rows": 10_000, "dim": 16, "clients": 2, "ops": 4, "batch": 256, "lookup_share": 0.5}
    else:
        plan = {"rows": 1_000_000, "dim": 128, "clients": 8, "ops": 100, "batch": 1024, "lookup_share": 0.8}
    weights = table_weights(plan["rows"], plan["dim"], seed=13)
    sample = np.arange(0, plan["rows"], max(1, plan["rows"] // 4096))
    server = KvstoreServer(ctx.tmpdir("mixed-server-"))
    try:
        systems = {"kvstore": server.address}
        from kvstore_client import KVStoreClient

        with KVStoreClient(server.address, timeout=600) as client:
            load_server(client, TABLE, weights, cache_slots(plan["rows"], 0.5), warm=True)
            check_rows("kvstore", client.lookup(TABLE, sample, on_miss="error"), weights[sample])
        redis = ctx.redis("mixed")
        if redis:
            redis.load(np.arange(plan["rows"], dtype=np.int64), weights)
            check_rows("redis", redis.mget(sample, plan["dim"]), weights[sample])
            systems["redis"] = str(redis.port)
        walls, calls = defaultdict(list), defaultdict(list)
        order = list(systems)
        for rep in range(ctx.reps):
            for system in order if rep % 2 == 0 else order[::-1]:
                wall, made = phase(system, systems[system], plan, rep)
                walls[system].append(wall)
                calls[system].append(made)
    finally:
        server.stop()
    records = mixed_records(plan, walls, calls)
    ctx.log.add(records)
    return records


def check_rows(system: str, got: np.ndarray, expected: np.ndarray) -> None:
    if not np.array_equal(got, expected):
        raise Disagreement(f"{system}: rows differ from the loaded rows")


def mixed_records(plan: dict, walls: dict, calls: dict) -> list[Record]:
    """Per system and method: rows/s over each phase's wall time (median of phases) and latencies."""
    records = []
    subject: dict[str, float] = {}
    for system in walls:
        role = SUBJECT if system == "kvstore" else PEER
        name = "kvstore client" if system == "kvstore" else "redis (hiredis)"
        for method in ("lookup", "apply_gradients"):
            rates = [sum(plan["batch"] for m, _ in made if m == method) / wall
                     for wall, made in zip(walls[system], calls[system], strict=True)]
            latencies = [s for made in calls[system] for m, s in made if m == method]
            value = float(np.median(rates))
            if role == SUBJECT:
                subject[method] = value
            ratio = None if role == SUBJECT else subject[method] / max(value, 1e-12)
            case = {"clients": plan["clients"], "batch": plan["batch"], "rows": plan["rows"], "dim": plan["dim"],
                    "method": method}
            records.append(Record("mixed", case, name, role, value, "rows/s", rates, ratio,
                                  latency_ms=latency_summary(latencies)))
    return records
