"""Memory per cached row: a kvstore-server process's resident memory per row, with its cache half
and 95% full, beside Redis holding the same rows and the rows' own bytes (the limit)."""
from __future__ import annotations

import numpy as np
from kvstore_client import KVStoreClient

from ..context import Context, table_weights
from ..harness import LIMIT, PEER, SUBJECT, Disagreement, Record, kvstore_ratio
from ..services import KvstoreServer
from .lookup_service import load_server

FILLS = (0.5, 0.95)


WARM_ROWS = 1024


def server_bytes_per_row(ctx: Context, weights: np.ndarray, slots: int) -> float:
    """Resident memory the server gained for these rows (all cached), per row. Counted from a
    server that has already loaded, read and dropped a small table, as Redis's figure counts from
    a running Redis: what a server takes once (its compiled loops, loaded beside its start; the
    first import's and lookup's buffers) is not per row."""
    server = KvstoreServer(ctx.tmpdir("memory-"))
    try:
        with KVStoreClient(server.address, timeout=600) as client:
            load_server(client, "memory-warm-up", weights[:WARM_ROWS], WARM_ROWS, warm=True)
            client.drop_table("memory-warm-up")
            before = server.rss()
            load_server(client, "memory", weights, slots, warm=True)
            sample = np.arange(0, len(weights), max(1, len(weights) // 1000))
            if not np.array_equal(client.lookup("memory", sample, on_miss="error"), weights[sample]):
                raise Disagreement("kvstore client lookup: rows differ from the loaded rows")
            return (server.rss() - before) / len(weights)
    finally:
        server.stop()


def redis_bytes_per_row(ctx: Context, weights: np.ndarray) -> float | None:
    redis = ctx.redis("lookup")
    if redis is None:
        return None
    before = redis.used_memory()
    ids = np.arange(len(weights), dtype=np.int64)
    redis.load(ids, weights)
    sample = ids[:: max(1, len(ids) // 1000)]
    if not np.array_equal(redis.mget(sample, weights.shape[1]), weights[sample]):
        raise Disagreement("redis MGET: rows differ from the loaded rows")
    used = (redis.used_memory() - before) / len(weights)
    redis.flush()
    return used


def run(ctx: Context, dim: int, slots: int, fills: tuple[float, ...] = FILLS) -> list[Record]:
    records: list[Record] = []
    row_bytes = dim * 4
    for fill in fills:
        rows = int(slots * fill)
        weights = table_weights(rows, dim, seed=7)
        case = {"part": "memory", "path": "service", "dim": dim, "cache_slots": slots, "fill": fill, "rows": rows}
        kv = server_bytes_per_row(ctx, weights, slots)
        found = [Record("lookup", case, "kvstore-server RSS", SUBJECT, kv, "bytes/row", better="lower",
                        note=f"{kv / row_bytes:.2f}x the row's bytes"),
                 Record("lookup", case, "row bytes (numpy array)", LIMIT, row_bytes, "bytes/row",
                        ratio=kvstore_ratio(kv, row_bytes, "lower"), better="lower")]
        redis = redis_bytes_per_row(ctx, weights)
        if redis is not None:
            found.append(Record("lookup", case, "redis used_memory", PEER, redis, "bytes/row",
                                ratio=kvstore_ratio(kv, redis, "lower"), better="lower",
                                note=f"{redis / row_bytes:.2f}x the row's bytes"))
        ctx.log.add(found)
        records += found
    return records
