"""`train`: one training step's store traffic per batch: look up the rows, then push their gradients
(SGD, duplicates summed, one step per unique row).

In process, `Store.lookup` + `Store.apply_gradients` beside the same step in NumPy on one
array (gather, sum duplicates, scatter: the limit). Through the service, the client's
lookup + apply_gradients beside a bare gRPC stream of the same bytes both ways (the limit)
and Redis used as a parameter server (MGET, the step in NumPy, MSET: the peer). Before
timing, every system steps the same first batch from the same rows, and the stepped rows
must agree within float32 rounding. The model-level comparison (a recommender with
RemoteEmbeddingBag against nn.EmbeddingBag) stays in `python -m bench script training_bench`.
"""
from __future__ import annotations

import numpy as np
from kvstore_client import KVStoreClient

from kvstore import CacheConfig, OptimizerConfig, Store, SweeperConfig, TableConfig

from .. import store_bench
from ..context import Context, cache_slots, table_weights
from ..harness import LIMIT, PEER, SUBJECT, Disagreement, Record, Side, check_agreement, interleave, records_from
from ..services import KvstoreServer, RedisConnection
from .common import make_batch
from .lookup_service import LOAD_CHUNK

LR = 0.01
RTOL = 1e-4                  # float32 rounding: duplicate gradients summed in another order


def sum_duplicates(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique ids, their summed gradients, and where each unique id first occurs."""
    unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    summed = np.zeros((len(unique), grads.shape[1]), grads.dtype)
    np.add.at(summed, inverse, grads)
    return unique, summed, first


def numpy_step(weights: np.ndarray, ids: np.ndarray, grads: np.ndarray) -> np.ndarray:
    rows = weights[ids]
    unique, summed, _ = sum_duplicates(ids, grads)
    weights[unique] -= LR * summed
    return rows


def redis_step(redis: RedisConnection, ids: np.ndarray, grads: np.ndarray, dim: int) -> np.ndarray:
    rows = redis.mget(ids, dim)
    unique, summed, first = sum_duplicates(ids, grads)
    redis.mset(unique, rows[first] - LR * summed)
    return rows


def training_batches(sampler, dist: str, batch: int, count: int, dim: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [make_batch(ids, rng.standard_normal((batch, dim), dtype=np.float32))
            for ids in sampler.batches(dist, batch, count)]


def check_stepped(readers: dict, expected: np.ndarray, ids: np.ndarray) -> None:
    """After every side stepped the first batch once, each holds the same rows."""
    for system, read in readers.items():
        got = read(ids)
        if not np.allclose(got, expected, rtol=RTOL, atol=RTOL):
            raise Disagreement(f"{system}: rows after one step differ from NumPy's")


def checked_compare(ctx: Context, case: dict, sides: list[Side], batches: list, reference: np.ndarray,
                    readers: dict, replay: bool) -> list[Record]:
    """Every side steps the first batch (forward rows must match), then the stepped rows must match the
    reference; then all sides are timed. With `replay`, the reference takes the timed steps too, so
    it stays in step with the systems for the next case."""
    first = batches[0]
    check_agreement(sides, first, reference[first.ids], rtol=RTOL)      # duplicates summed in another order
    if replay:
        numpy_step(reference, first.ids, first.grads)
    unique = np.unique(first.ids)
    check_stepped(readers, reference[unique], unique)
    timings = interleave(sides, batches, ctx.reps)
    if replay:
        for _ in range(ctx.reps):
            for batch in batches:
                numpy_step(reference, batch.ids, batch.grads)
    found = records_from("train", case, sides, timings, "rows/s")
    ctx.log.add(found)
    return found


def in_process(ctx: Context, weights: np.ndarray, cases: list[tuple[str, int]], count: int) -> list[Record]:
    rows, dim = weights.shape
    config = TableConfig("train", dim, optimizer=OptimizerConfig(name="sgd", lr=LR),
                         cache=CacheConfig(rows=cache_slots(rows, 0.5)))
    limit_weights = weights.copy()
    sampler = store_bench.IdSampler(rows, 1.05, seed=11)
    records = []
    with Store(str(ctx.tmpdir("train-")), sweeper=SweeperConfig(enabled=False)) as store:
        store.import_table("train", [(np.arange(rows, dtype=np.int64), weights)], mode="replace", config=config)
        store.lookup("train", np.arange(rows, dtype=np.int64), on_miss="error")
        for i, (dist, batch) in enumerate(cases):
            batches = training_batches(sampler, dist, batch, count, dim, seed=i)
            sides = [Side("kvstore Store lookup+apply_gradients", SUBJECT,
                          lambda b: step_store(store, b)),
                     Side("numpy gather+scatter", LIMIT, lambda b: numpy_step(limit_weights, b.ids, b.grads))]
            case = {"path": "in-process", "rows": rows, "dim": dim, "dist": dist, "batch": batch}
            readers = {"kvstore": lambda u: store.lookup("train", u, on_miss="error").weights}
            records += checked_compare(ctx, case, sides, batches, limit_weights, readers, replay=False)
    return records


def step_store(store: Store, batch) -> np.ndarray:
    rows = store.lookup("train", batch.ids, on_miss="error").weights
    store.apply_gradients("train", batch.ids, batch.grads)
    return rows


def service(ctx: Context, weights: np.ndarray, cases: list[tuple[str, int]], count: int) -> list[Record]:
    rows, dim = weights.shape
    reference = weights.copy()
    sampler = store_bench.IdSampler(rows, 1.05, seed=12)
    server = KvstoreServer(ctx.tmpdir("train-server-"))
    records = []
    try:
        with KVStoreClient(server.address, timeout=600) as client:
            client.create_table("train", dim, optimizer={"name": "sgd", "lr": LR},
                                cache={"rows": cache_slots(rows, 0.5)})
            for lo in range(0, rows, LOAD_CHUNK):
                ids = np.arange(lo, min(rows, lo + LOAD_CHUNK), dtype=np.int64)
                client.import_table("train", ids, weights[lo:lo + LOAD_CHUNK])
                client.lookup("train", ids, on_miss="error")
            redis = ctx.redis("train")
            if redis:
                redis.load(np.arange(rows, dtype=np.int64), weights)
            echo = ctx.echo()
            for i, (dist, batch) in enumerate(cases):
                batches = training_batches(sampler, dist, batch, count, dim, seed=100 + i)
                sides = [Side("kvstore client lookup+apply_gradients", SUBJECT, lambda b: step_client(client, b)),
                         Side("bare gRPC stream", LIMIT, lambda b: step_echo(echo, b, dim), check="shape")]
                if redis:
                    sides.append(Side("redis MGET+MSET (hiredis)", PEER, lambda b: redis_step(redis, b.ids, b.grads,
                                                                                                dim)))
                case = {"path": "service", "rows": rows, "dim": dim, "dist": dist, "batch": batch}
                readers = {"kvstore": lambda u: client.lookup("train", u, on_miss="error")}
                if redis:
                    readers["redis"] = lambda u: redis.mget(u, dim)
                records += checked_compare(ctx, case, sides, batches, reference, readers, replay=True)
    finally:
        server.stop()
    return records


def step_client(client: KVStoreClient, batch) -> np.ndarray:
    rows = client.lookup("train", batch.ids, on_miss="error")
    client.apply_gradients("train", batch.ids, batch.grads)
    return rows


def step_echo(echo, batch, dim: int) -> np.ndarray:
    rows = echo.lookup(batch.ids, dim)
    echo.push([batch.ids, batch.grads])
    return rows


def run(ctx: Context) -> list[Record]:
    if ctx.quick:
        rows, dim, cases, count = 10_000, 16, [("zipf", 1024)], 1
    else:
        rows, dim, count = 1_000_000, 128, 4
        cases = [(dist, batch) for dist in ("uniform", "zipf") for batch in (4096, 65536)]
    weights = table_weights(rows, dim, seed=3)
    return in_process(ctx, weights, cases, count) + service(ctx, weights, cases, count)
