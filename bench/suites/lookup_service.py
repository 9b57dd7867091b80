"""Lookups through the service: `KVStoreClient.lookup` against a kvstore-server process, beside a
bare gRPC stream of the same bytes (the limit) and Redis MGET of the same rows (the peer)."""
from __future__ import annotations

import numpy as np
from kvstore_client import KVStoreClient

from .. import store_bench
from ..context import Context, cache_slots, table_weights
from ..harness import LIMIT, PEER, SUBJECT, Record, Side, compare
from ..services import KvstoreServer
from .common import make_batches, observed_hit_rate

LOAD_CHUNK = 1 << 18


def load_server(client: KVStoreClient, name: str, weights: np.ndarray, slots: int, warm: bool) -> None:
    rows, dim = weights.shape
    client.create_table(name, dim, cache={"rows": slots})
    for lo in range(0, rows, LOAD_CHUNK):
        ids = np.arange(lo, min(rows, lo + LOAD_CHUNK), dtype=np.int64)
        client.import_table(name, ids, weights[lo:lo + LOAD_CHUNK])
        if warm:
            client.lookup(name, ids, on_miss="error")


def run(ctx: Context, rows: int, dim: int, batches: list[int], dists: list[str], per_rep: int) -> list[Record]:
    weights = table_weights(rows, dim, seed=dim)
    server = KvstoreServer(ctx.tmpdir("lookup-server-"))
    records: list[Record] = []
    try:
        with KVStoreClient(server.address, timeout=600) as client:
            tables = {"all": (f"cached_{dim}", cache_slots(rows, 0.5)), "cold": (f"cold_{dim}", 32)}
            for regime, (name, slots) in tables.items():
                load_server(client, name, weights, slots, warm=regime == "all")
            redis = ctx.redis("lookup")
            if redis:
                redis.load(np.arange(rows, dtype=np.int64), weights)
            echo = ctx.echo()
            sampler = store_bench.IdSampler(rows, 1.05, seed=rows + 1)
            for regime, (name, _) in tables.items():
                for dist in dists:
                    for batch in batches:
                        case = {"part": "service", "path": "service", "rows": rows, "dim": dim, "cache": regime,
                                "dist": dist, "batch": batch}
                        sides = [Side("kvstore client lookup", SUBJECT,
                                      lambda b, name=name: client.lookup(name, b.ids, on_miss="error")),
                                 Side("bare gRPC stream", LIMIT, lambda b: echo.lookup(b.ids, dim), check="shape")]
                        if redis:
                            sides.append(Side("redis MGET (hiredis)", PEER, lambda b: redis.mget(b.ids, dim)))
                        chosen = make_batches(sampler, dist, batch, per_rep)
                        hit_rate = observed_hit_rate(lambda name=name: client.stats(name))
                        found = compare("lookup", case, sides, chosen, ctx.reps, expected=weights[chosen[0].ids],
                                        notes=lambda hr=hit_rate: {"kvstore client lookup": hr()})
                        ctx.log.add(found)
                        records += found
    finally:
        server.stop()
    return records
