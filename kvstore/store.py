"""The store: tables over one RocksDB database in a data directory.

`Store` is the in-process API (library users call it directly) and the one
thing the gRPC server wraps. Table configs persist in the database beside the
rows, so reopening a data directory brings every table back as it was.

One `Writer` per store performs every RocksDB write that is not the reply to a
call, and its flusher writes each write-back table's dirty rows back at least
every `cache.flush_seconds`. A RocksDB write error puts the store in a fault
state (`fault`, `on_fault`): writes are refused, reads go on, and the writer
reopens the database until it takes writes again.

Each table lives in a column family of its own incarnation (`name@<hex>`), so a
dropped table's rows never come back under a new table of the same name.

Every call pins the live `Generation` (database + tables) it runs on, so a
snapshot restore can swap in another database while calls keep coming: calls
in flight finish on the old one. Writes also pass a store-wide `WriteGate`,
which a snapshot closes for the short moment of its checkpoint; reads never wait
on it. `Table` objects from `table()` belong to one generation: hold them only
for the duration of a call.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np

from .changefeed import ChangeFeed, ChangeFeedConfig
from .config import RocksConfig, SweeperConfig, TableConfig, validate_name
from .devices import placed_here
from .errors import FailedPrecondition, InvalidArgument, KVStoreError, StorageError, TableExists, TableNotFound
from .eviction import archive
from .eviction.sweeper import Sweeper
from .generation import Generation, Generations
from .rocks_tier import RocksTier
from .rows import encode_keys, row_records
from .snapshots import SnapshotDir, SnapshotInfo
from .table import LookupResult, Table, open_table
from .transfer import ImportStager, RowChunk, TableExport
from .write_gate import WriteGate
from .writer import Flusher, Writer

STAGING_DIR = "staging"
PRE_FLUSH_ROUNDS = 4     # flushes before a snapshot's pause, at most ...
PAUSE_ROWS = 4096        # ... until one writes no more than this (the rest is copied in the pause)
log = logging.getLogger(__name__)


class Store:
    def __init__(self, data_dir: str, rocks: RocksConfig | None = None,
                 clock: Callable[[], float] = time.time, sweeper: SweeperConfig | None = None,
                 changefeed: ChangeFeedConfig | None = None):
        self.data_dir = os.path.abspath(data_dir)
        self.clock = clock
        self.rocks_config = rocks
        self.snapshots = SnapshotDir(self.data_dir)
        self.gate = WriteGate()
        self.counters: Counter[str] = Counter()     # store-wide: snapshots, restores, imports
        self._lock = threading.RLock()   # guards the table map
        self._admin = threading.Lock()   # one snapshot or restore at a time
        self._closed = False
        os.makedirs(self.data_dir, exist_ok=True)
        live = self.snapshots.live_db()
        self.snapshots.remove_stale(live)
        shutil.rmtree(os.path.join(self.data_dir, STAGING_DIR), ignore_errors=True)
        self.changes = ChangeFeed(self.data_dir, changefeed, clock)    # replication and delta exports
        self.writer = Writer()
        try:
            self._gens = Generations(self._open_generation(live))
        except BaseException:
            self.writer.close()
            raise
        self.sweeper = Sweeper(self._live_tables, sweeper, clock)
        self.flusher = Flusher(self._live_tables, self.writer)

    def _live_tables(self) -> list[Table]:
        try:
            return list(self._tables.values())
        except KVStoreError:          # closed
            return []

    def _open_generation(self, db_name: str) -> Generation:
        rocks = RocksTier(os.path.join(self.data_dir, db_name), self.rocks_config)
        try:
            families = rocks.load_families()
            tables = {}
            for name, blob in rocks.load_configs().items():
                config = placed_here(TableConfig.from_dict(json.loads(blob)))   # the stored config keeps its device
                tables[name] = open_table(config, rocks, self.writer, self.clock, families.get(name, name))
                rocks.hold_above(tables[name].family, _cached_rows(config))
                tables[name].changes = self.changes
            _drop_orphans(rocks, tables.values())
        except BaseException:
            rocks.close()
            raise
        return Generation(rocks, tables, self.writer)

    @property
    def fault(self) -> str | None:
        """Why writes are refused (a RocksDB write error not yet recovered from), or None."""
        return self.writer.fault

    def on_fault(self, callback: Callable[[str | None], None]) -> None:
        """`callback(reason)` when a storage fault starts, `callback(None)` when it clears."""
        self.writer.on_fault(callback)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def rocks(self) -> RocksTier:
        """The RocksDB tier of the live database (changes on restore)."""
        return self._gens.live.rocks

    @property
    def _tables(self) -> dict[str, Table]:
        return self._gens.live.tables

    # --- tables ----------------------------------------------------------------

    def create_table(self, config: TableConfig) -> TableConfig:
        with self._lock, self.gate.writing(), self._gens.pin() as gen:
            if config.name in gen.tables:
                raise TableExists(f"name: table {config.name!r} already exists")
            self.writer.check()
            family = f"{config.name}@{uuid.uuid4().hex[:16]}"   # a new incarnation: never an old table's rows
            gen.rocks.create_family(family)
            try:
                table = open_table(config, gen.rocks, self.writer, self.clock, family)   # e.g. no CUDA device
                gen.rocks.hold_above(family, _cached_rows(config))
                gen.rocks.save_config(config.name, json.dumps(config.to_dict()).encode(), family)
            except BaseException:
                gen.rocks.drop_family(family)
                gen.rocks.drop_family(archive.archive_family(family))
                raise
            table.changes = self.changes
            gen.tables[config.name] = table
            return config

    def drop_table(self, name: str) -> None:
        with self._lock, self.gate.writing(), self._gens.pin() as gen:
            table = self._table(gen, name)
            table.eviction.cancelled.set()          # a sweep in progress stops at its next chunk
            with table.eviction.sweep_lock:
                table.drop()
                gen.rocks.save_config(name, None)
                del gen.tables[name]
                gen.rocks.drop_family(table.family)
                gen.rocks.drop_family(table.archive_family)
                self.changes.table_dropped(name)      # followers drop their copy

    def list_tables(self) -> list[str]:
        return sorted(self._tables)

    def describe_table(self, name: str) -> TableConfig:
        return self.table(name).config

    def table(self, name: str) -> Table:
        return self._table(self._gens.live, name)

    @staticmethod
    def _table(gen: Generation, name: str) -> Table:
        validate_name(name, "table")
        return gen.table(name)

    # --- rows --------------------------------------------------------------------

    def lookup(self, table: str, ids, on_miss: str = "init_insert", with_state: bool = False,
               out=None) -> LookupResult:
        with self._gens.pin() as gen:
            return self._table(gen, table).lookup(ids, on_miss, with_state, out)

    def lookup_if_cached(self, table: str, ids, with_state: bool = False, out=None,
                         wait: bool = False) -> LookupResult | None:
        """Rows of `ids` when all are cached and the table is free now (or, with `wait`, once it
        is), else None (see Table)."""
        with self._gens.pin() as gen:
            return self._table(gen, table).lookup_if_cached(ids, with_state, out, wait)

    def update(self, table: str, ids, weights, state=None, scores=None) -> int:
        with self.gate.writing(), self._gens.pin() as gen:
            return self._table(gen, table).update(ids, weights, state, scores)

    def delete(self, table: str, ids) -> int:
        with self.gate.writing(), self._gens.pin() as gen:
            return self._table(gen, table).delete(ids)

    def apply_gradients(self, table: str, ids, grads, owner: str | None = None, scores=None) -> int:
        with self.gate.writing(), self._gens.pin() as gen:
            return self._table(gen, table).apply_gradients(ids, grads, owner, scores)

    def apply_gradients_if_cached(self, table: str, ids, grads) -> int | None:
        """`apply_gradients` when no snapshot holds the write gate and the table can step the rows
        without waiting (see Table), else None with nothing changed."""
        with self.gate.writing(wait=False) as open_now, self._gens.pin() as gen:
            return self._table(gen, table).apply_gradients_if_cached(ids, grads) if open_now else None

    def prefetch(self, table: str, ids, lock: bool = False, owner: str = "") -> int:
        with self._gens.pin() as gen:
            return self._table(gen, table).prefetch(ids, lock, owner)

    def release(self, table: str, ids, owner: str = "") -> int:
        with self._gens.pin() as gen:
            return self._table(gen, table).release(ids, owner)

    def release_owner(self, owner: str) -> int:
        """Unpin every row `owner` holds in any table (its client disconnected)."""
        with self._gens.pin() as gen:
            return sum(t.release_all(owner) for t in list(gen.tables.values()))

    def stats(self, table: str) -> dict[str, float]:
        with self._gens.pin() as gen:
            return self._table(gen, table).stats()

    def store_stats(self) -> dict[str, float]:
        """Store-wide counters: snapshots (count, last and total pause and duration), restores, imports."""
        return {**{k: float(v) for k, v in self.counters.items()}, **self.changes.stats()}

    # --- snapshots -----------------------------------------------------------

    def create_snapshot(self, name: str) -> SnapshotInfo:
        """A point-in-time copy of every table. Dirty rows and memtables are flushed before the pause
        (writes keep flowing); the pause copies what RocksDB may still lack (rows queued for the
        writer, dirty rows of every tier) and takes the checkpoint; those rows are then written
        into the checkpoint, so the pause never waits for the writer."""
        validate_name(name, "name")
        with self._admin, self._gens.pin() as gen:
            start = time.perf_counter()
            tmp = self.snapshots.prepare(name)
            try:
                for table in list(gen.tables.values()):    # the bulk of the work, writes still flowing:
                    for _ in range(PRE_FLUSH_ROUNDS):          # again while writers dirtied many rows meanwhile
                        if table.flush() <= PAUSE_ROWS:
                            break
                gen.rocks.flush()                          # memtables: the checkpoint would flush them in the pause
                for table in list(gen.tables.values()):    # rows dirtied during that flush
                    table.flush()
                with self.gate.paused():
                    paused_at = time.perf_counter()
                    unsaved = {t.family: t.unsaved_rows() for t in gen.tables.values()}   # copies, no waits
                    configs = {n: t.config.to_dict() for n, t in gen.tables.items()}
                    _checkpoint(gen.rocks, os.path.join(tmp, "db"), name)
                    pause = time.perf_counter() - paused_at
                _complete(os.path.join(tmp, "db"), gen.rocks.config, unsaved, name)
                rows = {n: gen.rocks.estimate_rows(t.family) for n, t in gen.tables.items() if n in configs}
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            info = SnapshotInfo(name=name, created_at=self.clock(), tables=configs, rows=rows,
                                pause_seconds=pause, duration_seconds=time.perf_counter() - start)
            self.snapshots.publish(tmp, info)
            self._count("snapshot", info.pause_seconds, info.duration_seconds)
            return info

    def list_snapshots(self) -> list[SnapshotInfo]:
        return self.snapshots.list()

    def delete_snapshot(self, name: str) -> None:
        validate_name(name, "name")
        with self._admin:
            self.snapshots.delete(name)
            self.counters["snapshots_deleted"] += 1

    def restore_snapshot(self, name: str) -> SnapshotInfo:
        """Make a copy of snapshot `name` the live database, without stopping service.
        Calls in flight finish on the old database, which is closed and removed after;
        every cache starts empty. The snapshot itself stays as it was."""
        validate_name(name, "name")
        with self._admin:
            start = time.perf_counter()
            info = self.snapshots.info(name)
            db_name = self.snapshots.copy_to_db(name)
            try:
                gen = self._open_generation(db_name)
            except BaseException:
                shutil.rmtree(os.path.join(self.data_dir, db_name), ignore_errors=True)
                raise
            with self._lock:
                try:
                    self.snapshots.set_live(db_name)
                except BaseException:
                    gen.remove_dir = True
                    gen.close()
                    raise
                old = self._gens.acquire()         # held until its eviction sweeps have stopped
                self._gens.swap(gen)
                self.changes.reset()            # every table changed: followers re-bootstrap
            try:
                for table in list(old.tables.values()):
                    table.eviction.cancelled.set()
                    with table.eviction.sweep_lock:
                        pass
            finally:
                self._gens.release(old)
            self._count("restore", 0.0, time.perf_counter() - start)
            return info

    def _count(self, kind: str, pause: float, duration: float) -> None:
        counters = self.counters
        counters[f"{kind}s"] += 1
        counters[f"{kind}_seconds_last"] = duration
        counters[f"{kind}_seconds_total"] += duration
        if kind == "snapshot":
            counters["snapshot_pause_seconds_last"] = pause
            counters["snapshot_pause_seconds_total"] += pause
            counters["snapshot_pause_seconds_max"] = max(counters["snapshot_pause_seconds_max"], pause)

    # --- export and import ---------------------------------------------------

    def export_table(self, table: str, chunk_rows: int | None = None, encoder: str = "") -> TableExport:
        """Every row of `table` at this instant, in key order, as an iterable of `RowChunk` (or with
        `encoder`, "module:function", its `messages()` as that function encodes them in the worker
        process that reads the export). Iterate it to the end or call `close()`: until then it
        keeps a checkpoint and a worker process."""
        gen = self._gens.acquire()
        try:
            staging = os.path.join(self.data_dir, STAGING_DIR, f"export-{uuid.uuid4().hex}")
            return TableExport(self._table(gen, table), staging, chunk_rows,
                               on_close=lambda: self._gens.release(gen), encoder=encoder)
        except BaseException:
            self._gens.release(gen)
            raise

    def import_table(self, table: str, chunks: Iterable[RowChunk | tuple], mode: str = "merge",
                     config: TableConfig | None = None) -> int:
        """Load rows (chunks of ids, weights, state?, meta?) into `table`. Every chunk is
        validated and staged before the table changes; then one atomic ingest applies them.
        `replace` drops every existing row first; `merge` keeps rows not imported."""
        stager = self.stage_import(table, mode, config)
        try:
            for chunk in chunks:
                if isinstance(chunk, RowChunk):
                    stager.add(chunk.ids, chunk.weights, chunk.state, chunk.meta)
                else:
                    stager.add(*chunk)
        except BaseException:
            self.abort_import(stager)
            raise
        return self.commit_import(stager)

    def stage_import(self, table: str, mode: str = "merge", config: TableConfig | None = None) -> ImportStager:
        """The streaming form of `import_table`: `add` chunks, then `commit_import` (or `abort_import`).
        With `config`, a missing table is created from it (and dropped again if the import is aborted);
        an existing table must match its dim, dtype and optimizer state. A config from a machine with a
        cache device this one lacks gets a host-memory cache here (`devices.placed_here`)."""
        created = False
        if config is not None:
            config = placed_here(TableConfig.from_dict({**config.to_dict(), "name": table}))
            try:
                self.create_table(config)
                created = True
            except TableExists:
                _check_compatible(self.describe_table(table), config)
        target = self.table(table)
        staging = os.path.join(self.data_dir, STAGING_DIR, uuid.uuid4().hex)
        try:
            stager = ImportStager(target, staging, mode, self.clock)
        except (OSError, InvalidArgument) as exc:
            if created:
                self.drop_table(table)
            if isinstance(exc, InvalidArgument):
                raise
            raise StorageError(f"table: cannot stage import into {table!r}: {exc}") from None
        stager.created = created
        return stager

    def abort_import(self, stager: ImportStager) -> None:
        """Drop what was staged; a table the import created is dropped too, so nothing changed."""
        stager.abort()
        if stager.created:
            try:
                self.drop_table(stager.table.name)
            except TableNotFound:
                pass

    def commit_import(self, stager: ImportStager) -> int:
        with self.gate.writing(), self._gens.pin() as gen:
            if gen.tables.get(stager.table.name) is not stager.table:
                stager.abort()
                raise FailedPrecondition(f"table: {stager.table.name!r} was dropped or restored during the import; "
                                         "nothing was imported")
            rows = stager.commit()
        self.counters["rows_imported"] += rows
        return rows

    # --- eviction ----------------------------------------------------------------

    def evict(self, table: str) -> dict[str, int]:
        """Run one eviction sweep of `table` now (at the sweeper's rate); rows evicted by reason."""
        with self._gens.pin() as gen:
            return self.sweeper.sweep(self._table(gen, table)).counts()

    def restore_rows(self, table: str, ids) -> int:
        """Bring archived rows of `ids` back (ids that have a row again are left alone); rows restored."""
        with self.gate.writing(), self._gens.pin() as gen:
            return self._table(gen, table).restore_archived(ids, self.clock())

    # --- lifecycle ---------------------------------------------------------------

    def flush(self) -> int:
        """Write every dirty cached row to RocksDB and flush memtables."""
        with self._gens.pin() as gen:
            return self._flush(gen)

    @staticmethod
    def _flush(gen: Generation) -> int:
        written = sum(t.flush() for t in list(gen.tables.values()))
        gen.rocks.flush()
        return written

    def close(self) -> None:
        """Write every dirty row back and close the database; later calls fail with StoreClosed.
        In a storage fault it saves what the database still takes, logs what it could not,
        and does not raise."""
        with self._lock:
            if self._closed:
                return
            self.sweeper.close()
            self.flusher.close()
            self._closed = True
            gen = self._gens.shut()
            self._gens.join_retired()
            self.writer.stopping()                  # a write that fails now is tried once more, then logged
            if gen is None:
                self.writer.close()
                return
            flushed = False
            try:
                for table in list(gen.tables.values()):
                    table.flush()
                self.writer.close()
                gen.rocks.flush()
                flushed = True
            except KVStoreError as exc:
                log.error("closing the store: %s", exc)
            finally:
                self.writer.close()
                # after the last flush: the sequence is clean only if every row was saved
                self.changes.close(clean=flushed and not self.writer.unsaved_rows)
                if self.writer.unsaved_rows:
                    log.error("closing the store: %d rows could not be written (storage fault: %s)",
                              self.writer.unsaved_rows, self.writer.fault)
                try:
                    gen.close()
                except KVStoreError as exc:
                    log.error("closing the database: %s", exc)


def _check_compatible(existing: TableConfig, imported: TableConfig) -> None:
    """Rows of `imported`'s shape fit `existing` (the import goes into a table that already exists)."""
    for field in ("dim", "dtype", "state_dim"):
        have, want = getattr(existing, field), getattr(imported, field)
        if have != want:
            raise InvalidArgument(f"config.{field}: table {existing.name!r} has {have!r}, the import has {want!r}")


def _drop_orphans(rocks: RocksTier, tables) -> None:
    """Drop column families no table uses (a crash between dropping a table's config and its family)."""
    used = {t.family for t in tables} | {t.archive_family for t in tables}
    for family in rocks.families():
        if family not in used and (family.startswith(archive.archive_family("")) or "@" in family):
            rocks.drop_family(family)


def _complete(path: str, config: RocksConfig, unsaved: dict[str, tuple[np.ndarray, np.ndarray]], name: str) -> None:
    """Write into a fresh checkpoint the rows its tables had not yet written at the pause (queued
    for the writer, or dirty in a cache tier; the newest last): the checkpoint then holds every
    row as it was at the pause, whether or not the writer reached RocksDB before the checkpoint."""
    if not any(len(ids) for ids, _ in unsaved.values()):
        return
    try:
        copy = RocksTier(path, config)
        try:
            for family, (ids, rows) in unsaved.items():
                if len(ids):
                    values = row_records(rows).tolist()
                    copy.write(family, encode_keys(ids), values)
            copy.flush()                     # into SST files, whatever the WAL setting
        finally:
            copy.close()
    except StorageError as exc:
        raise FailedPrecondition(f"name: cannot write snapshot {name!r}: {exc}") from None


def _checkpoint(rocks: RocksTier, path: str, name: str) -> None:
    try:
        rocks.checkpoint(path)
    except StorageError as exc:      # a full or failing disk: say so, the live data is untouched
        raise FailedPrecondition(f"name: cannot write snapshot {name!r}: {exc}") from None


def _cached_rows(config: TableConfig) -> int:
    """Rows the table's cache tiers hold together (the device tier and a host tier under it)."""
    return config.cache.rows + config.cache.host_rows
