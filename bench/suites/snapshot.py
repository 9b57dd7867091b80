"""`snapshot`: a consistent point-in-time copy of a loaded table, taken through the service.

kvstore's `create_snapshot` (dirty cached rows written back, a RocksDB checkpoint; it
reports its write pause) beside a bare RocksDB checkpoint of a database holding the same
rows (the limit) and Redis BGSAVE of the same rows (the peer: its pause is the fork, its
duration lasts until the RDB file is written). Before each kvstore snapshot, cached rows
are dirtied (untimed). Afterwards each copy is checked: kvstore's last snapshot is restored
and read back, the checkpoint opened and read, and Redis reports a successful save of every key.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import rocksdict as rd
from kvstore_client import KVStoreClient

from kvstore.rows import encode_keys

from ..context import Context, table_weights
from ..harness import LIMIT, PEER, SUBJECT, Disagreement, Record, kvstore_ratio
from ..services import KvstoreServer, RedisPeer
from .lookup_service import load_server

CACHE_SLOTS = 1 << 16


def redis_bgsave(redis: RedisPeer) -> tuple[float, float]:
    """(duration, fork pause) of one BGSAVE: until the RDB file is written."""
    saves = redis.client.info("persistence")["rdb_saves"]
    start = time.perf_counter()
    redis.client.bgsave()
    while True:
        persistence = redis.client.info("persistence")
        if persistence["rdb_saves"] > saves and not persistence["rdb_bgsave_in_progress"]:
            break
        time.sleep(0.002)
    duration = time.perf_counter() - start
    if persistence["rdb_last_bgsave_status"] != "ok":
        raise Disagreement("redis: BGSAVE failed")
    return duration, redis.client.info("stats")["latest_fork_usec"] / 1e6


def raw_copy(path: str, weights: np.ndarray) -> rd.Rdict:
    db = rd.Rdict(path, rd.Options(raw_mode=True))
    ids = np.arange(len(weights), dtype=np.int64)
    for lo in range(0, len(ids), 1 << 16):
        wb = rd.WriteBatch(raw_mode=True)
        for key, value in zip(encode_keys(ids[lo:lo + (1 << 16)]),
                              weights[lo:lo + (1 << 16)].view(f"V{weights[:1].nbytes}").ravel().tolist(), strict=True):
            wb.put(key, value)
        db.write(wb)
    db.flush()
    return db


def timed_checkpoint(db: rd.Rdict, path: str) -> float:
    start = time.perf_counter()
    rd.Checkpoint(db).create_checkpoint(path)
    return time.perf_counter() - start


def check_checkpoint(path: str, weights: np.ndarray, sample: np.ndarray) -> None:
    copy = rd.Rdict(path, rd.Options(raw_mode=True), access_type=rd.AccessType.read_only())
    try:
        got = np.frombuffer(b"".join(copy.get(encode_keys(sample))), np.float32).reshape(len(sample), -1)
    finally:
        copy.close()
    if not np.array_equal(got, weights[sample]):
        raise Disagreement("rocksdict checkpoint: rows differ")


def take_snapshots(ctx: Context, client: KVStoreClient, raw: rd.Rdict, raw_dir, redis, dirty: np.ndarray
                   ) -> tuple[dict, dict]:
    """Each repetition: dirty cached rows (untimed), then one copy by each system, order reversed on odd reps."""
    durations: dict[str, list[float]] = {"kvstore": [], "rocksdict": [], "redis": []}
    pauses: dict[str, list[float]] = {"kvstore": [], "redis": []}
    order = ["kvstore", "rocksdict"] + (["redis"] if redis else [])
    for rep in range(ctx.reps):
        client.update("snap", np.arange(len(dirty), dtype=np.int64), dirty)
        for system in order if rep % 2 == 0 else order[::-1]:
            if system == "kvstore":
                info = client.create_snapshot(f"s{rep}")
                durations[system].append(info["duration_seconds"])
                pauses[system].append(info["pause_seconds"])
            elif system == "rocksdict":
                durations[system].append(timed_checkpoint(raw, str(raw_dir / f"ck{rep}")))
            else:
                duration, pause = redis_bgsave(redis)
                durations[system].append(duration)
                pauses[system].append(pause)
    return durations, pauses


def run(ctx: Context) -> list[Record]:
    rows, dim = (10_000, 16) if ctx.quick else (1_000_000, 128)
    weights = table_weights(rows, dim, seed=5)
    sample = np.sort(np.random.default_rng(5).choice(rows, min(rows, 4096), replace=False))
    server = KvstoreServer(ctx.tmpdir("snapshot-server-"))
    raw_dir = ctx.tmpdir("snapshot-raw-")
    try:
        with KVStoreClient(server.address, timeout=600) as client:
            load_server(client, "snap", weights, CACHE_SLOTS, warm=False)
            raw = raw_copy(str(raw_dir / "db"), weights)
            redis = ctx.redis("snapshot")
            if redis:
                redis.load(np.arange(rows, dtype=np.int64), weights)
            durations, pauses = take_snapshots(ctx, client, raw, raw_dir, redis, weights[: min(rows, CACHE_SLOTS // 2)])
            raw.close()
            client.update("snap", sample, np.zeros((len(sample), dim), np.float32))
            client.restore_snapshot(f"s{ctx.reps - 1}")
            if not np.array_equal(client.lookup("snap", sample, on_miss="error"), weights[sample]):
                raise Disagreement("kvstore snapshot: restored rows differ from the rows snapshotted")
            check_checkpoint(str(raw_dir / f"ck{ctx.reps - 1}"), weights, sample)
            if redis and redis.client.dbsize() != rows:
                raise Disagreement(f"redis: {redis.client.dbsize()} keys saved, expected {rows}")
    finally:
        server.stop()
    return snapshot_records(ctx, {"rows": rows, "dim": dim}, durations, pauses)


def snapshot_records(ctx: Context, case: dict, durations: dict, pauses: dict) -> list[Record]:
    names = {"kvstore": ("kvstore create_snapshot", SUBJECT), "rocksdict": ("rocksdict checkpoint", LIMIT),
             "redis": ("redis BGSAVE", PEER)}
    records = []
    for figure, values in (("duration", durations), ("write pause", pauses)):
        subject = statistics.median(values["kvstore"])
        for key, reps in values.items():
            if not reps:
                continue
            value = statistics.median(reps)
            system, role = names[key]
            ratio = None if role == SUBJECT else kvstore_ratio(subject, value, "lower")
            note = "fork time" if (key, figure) == ("redis", "write pause") else ""
            records.append(Record("snapshot", {**case, "figure": figure}, system, role, value, "s", reps, ratio,
                                  better="lower", note=note))
    ctx.log.add(records)
    return records
