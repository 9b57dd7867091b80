"""`ingest`: writing new rows in batches.

In process, `Store.update` on a write-through table (acknowledged writes are in the WAL, as
with the limit) beside rocksdict write batches of the same pre-encoded rows (header, weights)
into a database of its own. Through the service, the client's `update` (the table's default
write-back policy) beside a bare gRPC stream of the same bytes (the limit) and Redis MSET,
pipelined (the peer; no persistence). Every system writes fresh ids; afterwards the first
batch each wrote is read back and must equal the rows sent.
"""
from __future__ import annotations

import numpy as np
import rocksdict as rd
from kvstore_client import KVStoreClient

from kvstore import CacheConfig, Store, SweeperConfig, TableConfig
from kvstore.rows import RowLayout, encode_keys

from ..context import Context, table_weights
from ..harness import LIMIT, PEER, SUBJECT, Disagreement, Record, Side, interleave, records_from
from ..services import KvstoreServer
from .common import make_batch

CACHE_SLOTS = 1 << 16


class FreshIds:
    """Each call writes the next ids of its own range: base, base+1, ...; rows repeat `block`."""

    def __init__(self, base: int, write):
        self.base = self.next = base
        self.write = write

    def __call__(self, batch) -> None:
        ids = np.arange(self.next, self.next + len(batch), dtype=np.int64)
        self.next += len(batch)
        self.write(ids, batch)


def check_written(readers: dict, bases: dict, block: np.ndarray, batch: int) -> None:
    ids = np.arange(batch, dtype=np.int64)
    for system, read in readers.items():
        if not np.array_equal(read(ids + bases[system]), block[:batch]):
            raise Disagreement(f"{system}: rows read back differ from the rows written")


def raw_writer(path: str, layout: RowLayout, block: np.ndarray):
    """rocksdict in raw mode; values are whole stored rows (header, weights), encoded beforehand."""
    db = rd.Rdict(path, rd.Options(raw_mode=True))
    rows = layout.empty(len(block))
    layout.weights(rows)[:] = block
    values = layout.to_values(rows)

    def write(ids, batch) -> None:
        wb = rd.WriteBatch(raw_mode=True)
        for key, value in zip(encode_keys(ids), values, strict=False):
            wb.put(key, value)
        db.write(wb)

    def read(ids) -> np.ndarray:
        return layout.weights(layout.from_values(db.get(encode_keys(ids))))

    return db, write, read


def in_process(ctx: Context, block: np.ndarray, batch: int, count: int) -> list[Record]:
    dim = block.shape[1]
    config = TableConfig("ingest", dim, cache=CacheConfig(rows=CACHE_SLOTS, write="write_through"))
    batches = [make_batch(np.arange(batch)) for _ in range(count)]
    with Store(str(ctx.tmpdir("ingest-")), sweeper=SweeperConfig(enabled=False)) as store:
        store.create_table(config)
        db, raw_write, raw_read = raw_writer(str(ctx.tmpdir("ingest-raw-")), RowLayout.of(config), block)
        try:
            bases = {"kvstore": 0, "rocksdict": 1 << 40}
            sides = [Side("kvstore Store.update (write-through)", SUBJECT,
                          FreshIds(bases["kvstore"], lambda ids, b: store.update("ingest", ids, block[:len(ids)]))),
                     Side("rocksdict write batch", LIMIT, FreshIds(bases["rocksdict"], raw_write))]
            timings = interleave(sides, batches, ctx.reps)
            check_written({"kvstore": lambda ids: store.lookup("ingest", ids, on_miss="error").weights,
                           "rocksdict": raw_read}, bases, block, batch)
        finally:
            db.close()
    case = {"path": "in-process", "dim": dim, "batch": batch, "write": "write_through"}
    return records_from("ingest", case, sides, timings, "rows/s")


def service(ctx: Context, block: np.ndarray, batch: int, count: int) -> list[Record]:
    dim = block.shape[1]
    batches = [make_batch(np.arange(batch)) for _ in range(count)]
    server = KvstoreServer(ctx.tmpdir("ingest-server-"))
    try:
        with KVStoreClient(server.address, timeout=600) as client:
            client.create_table("ingest", dim, cache={"rows": CACHE_SLOTS})
            redis = ctx.redis("ingest")
            echo = ctx.echo()
            bases = {"kvstore": 0, "redis": 1 << 40}
            sides = [Side("kvstore client update", SUBJECT,
                          FreshIds(bases["kvstore"], lambda ids, b: client.update("ingest", ids, block[:len(ids)]))),
                     Side("bare gRPC stream", LIMIT, lambda b: echo.push([b.ids, block[:len(b)]]))]
            readers = {"kvstore": lambda ids: client.lookup("ingest", ids, on_miss="error")}
            if redis:
                sides.append(Side("redis MSET (hiredis)", PEER,
                                  FreshIds(bases["redis"], lambda ids, b: redis.mset(ids, block[:len(ids)]))))
                readers["redis"] = lambda ids: redis.mget(ids, dim)
            timings = interleave(sides, batches, ctx.reps)
            check_written(readers, bases, block, batch)
    finally:
        server.stop()
    case = {"path": "service", "dim": dim, "batch": batch, "write": "write_back"}
    return records_from("ingest", case, sides, timings, "rows/s")


def run(ctx: Context) -> list[Record]:
    if ctx.quick:
        dim, batches, rows_per_rep = 16, [1024], 2048
    else:
        dim, batches, rows_per_rep = 128, [4096, 65536], 1 << 18
    records = []
    for batch in batches:
        block = table_weights(batch, dim, seed=batch)
        count = max(1, rows_per_rep // batch)
        for part in (in_process, service):
            found = part(ctx, block, batch, count)
            ctx.log.add(found)
            records += found
    return records
