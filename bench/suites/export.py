"""`export`: a whole table out (and back in), in MiB/s of ids and weights.

In process: `Store.export_table` beside a bare rocksdict scan of the same column family
(the limit). Through the service, on the same data directory: the `kvstore export` command
(a process writing the export directory, as operators run it) and the client's export stream,
beside the same bare scan, plain writes of as many bytes to 64 MiB files (what the disk allows
the command) and Redis dumping the same rows with SCAN + MGET (the peer). Then
`kvstore import` of the export into a new table, beside SstFileWriter + ingest of the same
rows pre-encoded (the limit). Each copy is checked: row counts everywhere, the export
directory read back row for row, the imported table sampled.
"""
from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import rocksdict as rd
from kvstore_client import KVStoreClient
from kvstore_proto.export_format import FILE_BYTES, ExportReader

from kvstore import CacheConfig, Store, SweeperConfig, TableConfig
from kvstore.rows import RowLayout, encode_keys

from .. import store_bench
from ..context import Context, table_weights
from ..harness import LIMIT, PEER, SUBJECT, Disagreement, Record, Side, interleave, records_from
from ..report import python_env
from ..services import KvstoreServer

TABLE = "exp"
SCAN_ROWS = 1 << 16


def raw_scan(family) -> int:
    """Every (key, value) of a column family, in batches, as the store's export reads them."""
    opts = rd.ReadOptions()
    opts.fill_cache(False)
    items = family.items(read_opt=opts)
    count = 0
    while batch := list(itertools.islice(items, SCAN_ROWS)):
        count += len(batch)
    return count


def redis_dump(redis, dim: int) -> int:
    count, cursor = 0, 0
    while True:
        cursor, keys = redis.client.scan(cursor, count=4096)
        if keys:
            values = redis.client.mget(keys)
            count += len(np.frombuffer(b"".join(values), np.float32)) // dim
        if cursor == 0:
            return count


def kvstore_command(address: str, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "kvstore_client", "--address", address, "--quiet", *args],
                   check=True, env=python_env(), stdout=subprocess.DEVNULL)


class Numbered:
    """Calls `make(n)` with n = 0, 1, 2, ...: each export a new directory, each import a new table."""

    def __init__(self, make):
        self.make, self.n = make, 0

    def __call__(self, _batch) -> int:
        self.n += 1
        return self.make(self.n - 1)


def counts_agree(sides: list[Side], rows: int) -> None:
    for side in sides:
        got = side.call(rows)
        if got is not None and got != rows:
            raise Disagreement(f"{side.system}: {got} rows, expected {rows}")


def in_process(ctx: Context, data_dir: Path, weights: np.ndarray, payload: int) -> tuple[list[Record], str, str]:
    """Records, the path of the database and the table's column family (the service then serves the
    same directory)."""
    rows, dim = weights.shape
    config = TableConfig(TABLE, dim, cache=CacheConfig(rows=1 << 12))
    with Store(str(data_dir), sweeper=SweeperConfig(enabled=False)) as store:
        store.import_table(TABLE, [(np.arange(rows, dtype=np.int64), weights)], mode="replace", config=config)
        store.flush()
        db_path, family_name = store.rocks.path, store.table(TABLE).family
        raw, family = store_bench.open_raw(db_path, read_only=True, families=(family_name,))
        try:
            sides = [Side("kvstore Store.export_table", SUBJECT,
                          lambda _: sum(len(chunk.ids) for chunk in store.export_table(TABLE))),
                     Side("rocksdict scan", LIMIT, lambda _: raw_scan(family))]
            counts_agree(sides, rows)
            timings = interleave(sides, [rows], ctx.reps, units=lambda _: payload / 2**20)
        finally:
            raw.close()
    case = {"path": "in-process", "rows": rows, "dim": dim, "direction": "export"}
    return records_from("export", case, sides, timings, "MiB/s"), db_path, family_name


def check_export_dir(path: Path, weights: np.ndarray) -> None:
    parts = list(ExportReader(str(path)))
    ids = np.concatenate([p.ids for p in parts])
    if not np.array_equal(ids, np.arange(len(weights))) or \
            not np.array_equal(np.concatenate([p.weights for p in parts]), weights):
        raise Disagreement("kvstore export: the export directory does not hold the table's rows")


def file_writes(out: Path, payload: int) -> Numbered:
    """Writing `payload` bytes as 64 MiB files into a new directory (the previous one removed, as
    the command's side does): what the disk and page cache allow an export directory."""
    block = np.random.default_rng(0).integers(0, 255, FILE_BYTES, dtype=np.uint8)

    def write(n: int) -> None:
        shutil.rmtree(out / str(n - 1), ignore_errors=True)
        (out / str(n)).mkdir(parents=True)
        for index, start in enumerate(range(0, payload, FILE_BYTES)):
            with open(out / str(n) / f"{index:06d}", "wb") as file:
                file.write(block[:min(FILE_BYTES, payload - start)].data)
        return None

    return Numbered(write)


def service_export(ctx: Context, server: KvstoreServer, client: KVStoreClient, db_path: str,
                   family_name: str, weights: np.ndarray, payload: int) -> list[Record]:
    rows, dim = weights.shape
    out = ctx.tmpdir("export-out-")

    def cli_export(n: int) -> None:
        shutil.rmtree(out / str(n - 1), ignore_errors=True)
        kvstore_command(server.address, "export", TABLE, str(out / str(n)))

    raw, family = store_bench.open_raw(db_path, read_only=True, families=(family_name,))
    try:
        sides = [Side("kvstore export (command)", SUBJECT, Numbered(cli_export)),
                 Side("kvstore client export stream", SUBJECT,
                      lambda _: sum(len(chunk.ids) for chunk in client.export(TABLE))),
                 Side("rocksdict scan", LIMIT, lambda _: raw_scan(family)),
                 Side("files written, 64 MiB each", LIMIT, file_writes(ctx.tmpdir("export-files-"), payload))]
        redis = ctx.redis("export")
        if redis:
            redis.load(np.arange(rows, dtype=np.int64), weights)
            sides.append(Side("redis SCAN+MGET (hiredis)", PEER, lambda _: redis_dump(redis, dim)))
        counts_agree(sides, rows)
        check_export_dir(out / "0", weights)
        timings = interleave(sides, [rows], ctx.reps, units=lambda _: payload / 2**20)
    finally:
        raw.close()
    case = {"path": "service", "rows": rows, "dim": dim, "direction": "export"}
    records = records_from("export", case, sides, timings, "MiB/s")
    scan = timings["rocksdict scan"].median
    records[1].note = f"{records[1].value / scan:.2f} of the scan"
    return records


def raw_ingest(path: Path, layout: RowLayout, weights: np.ndarray):
    """SstFileWriter + ingest of rows encoded beforehand, into a database of its own."""
    db = rd.Rdict(str(path / "db"), rd.Options(raw_mode=True))
    rows = layout.empty(len(weights))
    layout.weights(rows)[:] = weights
    keys, values = encode_keys(np.arange(len(weights), dtype=np.int64)), layout.to_values(rows)

    def ingest(n: int) -> None:
        sst = str(path / f"{n}.sst")
        writer = rd.SstFileWriter(rd.Options(raw_mode=True))
        writer.open(sst)
        for key, value in zip(keys, values, strict=True):
            writer[key] = value
        writer.finish()
        db.ingest_external_file([sst])

    return db, ingest


def service_import(ctx: Context, server: KvstoreServer, client: KVStoreClient, weights: np.ndarray,
                   payload: int) -> list[Record]:
    rows, dim = weights.shape
    source = ctx.tmpdir("import-src-") / "export"
    kvstore_command(server.address, "export", TABLE, str(source))

    def cli_import(n: int) -> None:
        if n:
            client.drop_table(f"imp{n - 1}")
        kvstore_command(server.address, "import", f"imp{n}", str(source))

    raw_dir = ctx.tmpdir("import-raw-")
    db, ingest = raw_ingest(raw_dir, RowLayout.of(TableConfig(TABLE, dim)), weights)
    try:
        sides = [Side("kvstore import (command)", SUBJECT, Numbered(cli_import)),
                 Side("rocksdict SstFileWriter+ingest", LIMIT, Numbered(ingest))]
        timings = interleave(sides, [rows], ctx.reps, units=lambda _: payload / 2**20)
        sample = np.arange(0, rows, max(1, rows // 4096))
        last = f"imp{ctx.reps - 1}"
        if not np.array_equal(client.lookup(last, sample, on_miss="error"), weights[sample]):
            raise Disagreement("kvstore import: imported rows differ from the exported ones")
        raw_rows = np.frombuffer(b"".join(db.get(encode_keys(sample))), np.uint8).reshape(len(sample), -1)
        if not np.array_equal(RowLayout.of(TableConfig(TABLE, dim)).weights(raw_rows), weights[sample]):
            raise Disagreement("rocksdict ingest: rows differ")
    finally:
        db.close()
    case = {"path": "service", "rows": rows, "dim": dim, "direction": "import"}
    return records_from("export", case, sides, timings, "MiB/s")


def run(ctx: Context) -> list[Record]:
    rows, dim = (10_000, 16) if ctx.quick else (1_000_000, 128)
    weights = table_weights(rows, dim, seed=9)
    payload = rows * (8 + dim * 4)
    data_dir = ctx.tmpdir("export-")
    found, db_path, family_name = in_process(ctx, data_dir, weights, payload)
    ctx.log.add(found)
    records = found
    ctx.log.note("export", f"MiB/s of ids and weights: {payload / 2**20:.1f} MiB per pass")
    server = KvstoreServer(data_dir)
    try:
        with KVStoreClient(server.address, timeout=600) as client:
            for found in (service_export(ctx, server, client, db_path, family_name, weights, payload),
                          service_import(ctx, server, client, weights, payload)):
                ctx.log.add(found)
                records += found
    finally:
        server.stop()
    return records
