"""Delta checkpoints: rows changed since a change-feed sequence, and chained imports of them.

A delta export lists the ids the change feed recorded for a table after
`since_sequence` (up to `sequence`, the feed's last at the start of the export,
read under the table lock), and the stored ids inside the id ranges merge imports
recorded, and reads each one as it is now: a row that exists
is sent with its current value, one that does not (deleted, evicted) as a
tombstone. Rows are read a slice at a time, so a row changed after `sequence`
may already show its newer value; the next delta sends it again, so applying
a chain in order converges on the table.

On the importing side each table remembers where its last import ended (the
`sequence` of the full export or delta it applied, in `<data-dir>/import-chains.json`).
A delta must start exactly there, or it is refused with FailedPrecondition naming
both sequences. Applying a delta is idempotent: a delta whose import failed half
way (rows ingested, tombstones not yet applied) can be imported again.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import FailedPrecondition, InvalidArgument
from .id_ranges import NO_RANGES
from .rocks_tier import FamilyNotFound
from .rows import decode_keys, encode_keys
from .table import Table
from .transfer import ImportStager, RowChunk, default_chunk_rows, rows_to_chunk

CHAINS_FILE = "import-chains.json"
READ_SLICE = 8192          # ids read under the table lock at a time
_chain_locks: dict[str, threading.Lock] = {}
_chain_locks_guard = threading.Lock()


@dataclass
class DeltaChunk:
    rows: RowChunk               # rows that exist now, increasing ids
    tombstones: np.ndarray       # [k] int64 ids that no longer exist


def read_changes(table: Table, ids: np.ndarray, slice_rows: int = READ_SLICE) -> Iterator[DeltaChunk]:
    """Current rows and tombstones of unique, increasing `ids`, a slice at a time."""
    for start in range(0, len(ids), slice_rows):
        part = ids[start:start + slice_rows]
        rows, exists = table.read_rows(part)
        yield DeltaChunk(rows_to_chunk(table.layout, part[exists], rows[exists]), part[~exists])


def read_table_changes(table: Table, ids: np.ndarray, ranges: np.ndarray = NO_RANGES,
                       slice_rows: int = READ_SLICE) -> Iterator[DeltaChunk]:
    """The changes of one table the feed recorded as `ids` and as id `ranges` (merge imports): the
    ids first, then every stored row in the ranges that is not among them, a slice at a time.
    Every imported row reached RocksDB at its commit, so a scan of the ranges finds it (or it was
    deleted or written since, and is among `ids`)."""
    yield from read_changes(table, ids, slice_rows)
    for lo, hi in ranges.tolist():
        start = lo
        while True:
            try:
                keys, _ = table.rocks.scan(table.family, encode_keys(np.array([start], np.int64))[0], slice_rows)
            except FamilyNotFound:          # dropped meanwhile: the feed says so
                return
            found = decode_keys(keys) if keys else ids[:0]
            inside = found[found <= hi]
            yield from read_changes(table, inside[~np.isin(inside, ids)], slice_rows)
            if len(inside) < slice_rows or inside[-1] == hi:
                break
            start = int(inside[-1]) + 1


class DeltaExport:
    """The changes of one table after `since`: iterate it for `DeltaChunk`s."""

    def __init__(self, store, table: str, since: int, chunk_rows: int | None = None):
        if isinstance(since, bool) or not isinstance(since, (int, np.integer)) or since < 0:
            raise InvalidArgument(f"since_sequence: must be a sequence number >= 0, got {since!r}")
        self.table = store.table(table)
        self.config = self.table.config
        self.since = since
        # a write records its sequence after it is applied: every change up to `through` is in the table
        changes = store.changes.changes(since, [table], field="since_sequence")
        if table in changes.dropped:
            raise FailedPrecondition(f"since_sequence: table {table!r} was dropped and created again after sequence "
                                     f"{since}; take a full export")
        self.sequence = changes.through
        self.ids = changes.ids.get(table, np.zeros(0, np.int64))
        self.ranges = changes.ranges.get(table, NO_RANGES)
        self.chunk_rows = chunk_rows or default_chunk_rows(self.table.layout)
        self.rows = 0
        self.tombstones = 0

    def __iter__(self) -> Iterator[DeltaChunk]:
        for chunk in read_table_changes(self.table, self.ids, self.ranges, min(self.chunk_rows, READ_SLICE)):
            self.rows += len(chunk.rows)
            self.tombstones += len(chunk.tombstones)
            self.table.counters["rows_exported"] += len(chunk.rows)
            yield chunk


def export_since(store, table: str, since: int, chunk_rows: int | None = None) -> DeltaExport:
    """Rows of `table` changed after change-feed sequence `since`, plus tombstones (see the module doc)."""
    return DeltaExport(store, table, since, chunk_rows)


class ImportChains:
    """Where each table's last import ended, persisted beside the database (fsync'd, replaced atomically)."""

    def __init__(self, data_dir: str):
        self.path = os.path.join(data_dir, CHAINS_FILE)
        with _chain_locks_guard:
            self.lock = _chain_locks.setdefault(self.path, threading.Lock())

    def _read(self) -> dict[str, int]:
        try:
            with open(self.path) as src:
                return {str(k): int(v) for k, v in json.load(src).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            raise FailedPrecondition(f"table: cannot read {CHAINS_FILE}: {exc}") from None

    def get(self, table: str) -> int | None:
        return self._read().get(table)

    def check(self, table: str, since: int) -> None:
        ended = self.get(table)
        if ended is None:
            raise FailedPrecondition(f"since_sequence: table {table!r} has no import to continue: import the full "
                                     f"export first (this delta starts at sequence {since})")
        if ended != since:
            raise FailedPrecondition(f"since_sequence: this delta starts at sequence {since}, but the last import "
                                     f"into table {table!r} ended at sequence {ended}; import the deltas in order")

    def set(self, table: str, sequence: int) -> None:
        chains = self._read()
        chains[table] = int(sequence)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as out:
            json.dump(chains, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)


def commit_link(store, stager: ImportStager, sequence: int, since: int | None, tombstones: np.ndarray) -> int:
    """Apply one staged link of a chain: a full export (`since` None: starts the chain) or a delta
    (must start where the table's last import ended; its tombstones are deleted after its rows land)."""
    chains = ImportChains(store.data_dir)
    table = stager.table.name
    with chains.lock:
        if since is not None:
            try:
                chains.check(table, since)
            except FailedPrecondition:
                store.abort_import(stager)
                raise
        rows = store.commit_import(stager)
        if len(tombstones):
            store.delete(table, np.unique(tombstones))
        chains.set(table, sequence)
    return rows


def import_link(store, table: str, chunks: Iterable[DeltaChunk | RowChunk], sequence: int,
                since: int | None = None, mode: str = "merge", config=None) -> int:
    """The in-process form of a chained import: stage every chunk, then `commit_link`. Returns rows."""
    stager = store.stage_import(table, "merge" if since is not None else mode, config)
    tombstones: list[np.ndarray] = []
    try:
        if since is not None:
            ImportChains(store.data_dir).check(table, since)     # refuse before staging anything
        for chunk in chunks:
            rows = chunk.rows if isinstance(chunk, DeltaChunk) else chunk
            stager.add(rows.ids, rows.weights, rows.state, rows.meta)
            if isinstance(chunk, DeltaChunk):
                tombstones.append(chunk.tombstones)
    except BaseException:
        store.abort_import(stager)
        raise
    return commit_link(store, stager, sequence, since, np.concatenate(tombstones or [np.zeros(0, np.int64)]))
