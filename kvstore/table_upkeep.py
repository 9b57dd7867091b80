"""The bulk half of `Table`: flushing, what snapshots and exports read, imports, sweeps, archive, drop.

`Table` mixes this in: these methods are the table's own, holding its lock and using its state
as its other methods do (nothing outside the table touches that state). They move many rows at
a time, through the store's writer, a slice per hold of the lock where a caller may be waiting.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from .errors import FailedPrecondition
from .eviction import archive
from .id_ranges import NO_RANGES, covers
from .rows import encode_keys
from .writer import WriteJob

FLUSH_SLICE = 4096           # rows handed to the writer per hold of the table lock
_NO_IDS = np.zeros(0, np.int64)


class TableUpkeep:
    # --- flushing ----------------------------------------------------------------

    def flush(self, slice_rows: int = FLUSH_SLICE) -> int:
        """Hand every dirty cached row (and clean rows with stale access metadata) to the
        writer, a slice per hold of the table lock, and wait until RocksDB has them all.
        Returns the dirty rows written. Rows dirtied meanwhile wait for the next flush."""
        with self._flush_lock:
            started = time.monotonic()
            with self._lock:
                candidates = self._flush_candidates()
                # in id order (RocksDB's key order): each slice's keys then sit close together in the
                # memtable, and its inserts cost less than those of keys from all over the table
                candidates = candidates[np.argsort(self.cache.keys_of(candidates))]
            jobs, written = [], 0
            for at in range(0, len(candidates), slice_rows):
                with self._lock:
                    if self._dropped:
                        break
                    job, dirty = self._hand_over(candidates[at:at + slice_rows], "flush")
                    jobs.append(job)
                    written += dirty
                time.sleep(0)        # let a waiting caller take the lock between slices
            with self._lock:
                job, dirty = self._hand_over_lower()
                jobs.append(job)
                written += dirty
            for job in jobs:
                if job is not None:
                    job.wait()
            self._save_row_count()
            self.last_flush = started
            return written

    def _save_row_count(self) -> None:
        rows = self.eviction.rows
        if rows is not None and rows != self._saved_rows and not self._dropped:
            rocks, family = self.rocks, self.family
            self._run_job(lambda: rocks.save_row_count(family, rows), "row count")
            self._saved_rows = rows

    def _flush_candidates(self) -> np.ndarray:
        """Dirty slots, and clean ones whose access metadata RocksDB lacks (only tables with
        eviction rules keep it: the others skip the scan of every clean slot)."""
        dirty = self.cache.dirty_slots()
        if not self.eviction.persist_touches:
            return dirty
        clean = self.cache.clean_slots()
        return np.concatenate([dirty, clean[self.eviction.stale(self.cache, clean)]])

    def _hand_over(self, slots: np.ndarray, what: str) -> tuple[WriteJob | None, int]:
        """Under the lock: give the rows of `slots` that are dirty or stale to the writer; they
        are clean from now on (the eviction tracker hears they are synced)."""
        occupied, dirty = self.cache.flags(slots)
        slots, dirty = slots[occupied], dirty[occupied]
        slots = slots[dirty | self.eviction.stale(self.cache, slots)]
        job = self._write_behind(self.cache.keys_of(slots), self.cache.rows(slots), what)
        self.cache.set_dirty(slots, False)
        self.eviction.synced(self.cache, slots)
        return job, int(dirty.sum())

    def _settle(self) -> None:
        """Under the lock: every change so far is in RocksDB when this returns (the part not yet
        handed over is small after a `flush`, so the lock is held briefly)."""
        self._hand_over(self._flush_candidates(), "flush")
        self._hand_over_lower()
        self.pending.wait_for_all()

    def _hand_over_lower(self) -> tuple[WriteJob | None, int]:
        """Under the lock: the dirty rows of the tier below to the writer."""
        if self._dropped:
            return None, 0
        ids, rows = self.lower.take_dirty()
        return self._write_behind(ids, rows, "flush"), len(ids)

    def unsaved_rows(self, touched: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) of every change RocksDB may not have yet, oldest first: rows queued for the
        writer, then dirty rows of each tier (with `touched`, also clean cached rows whose access
        metadata RocksDB lacks). Nothing changes: a snapshot or an export writes them over its
        checkpoint, so its pause costs a copy of these rows, not a wait for RocksDB."""
        with self._lock:
            parts = [self.pending.all()]
            slots = self._flush_candidates() if touched else self.cache.dirty_slots()
            parts.append((self.cache.keys_of(slots), self.cache.rows(slots)))
            parts.append(self.lower.peek_dirty())
            parts = [(ids, rows) for ids, rows in parts if len(ids)]
            if not parts:
                return _NO_IDS, self.layout.empty(0)
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def settle(self) -> None:
        """Write every change made so far to RocksDB, holding the table lock meanwhile (after a
        `flush`, only the rows changed since). A snapshot calls it while writes are paused."""
        with self._lock:
            self._settle()

    def export_cut(self, checkpoint: Callable[[], None]) -> tuple[np.ndarray, np.ndarray, int]:
        """The table at this instant for an export, without writing anything: under the table
        lock, a copy of its unsaved rows (`unsaved_rows(touched=True)`) and `checkpoint()` (a
        RocksDB checkpoint, which holds whatever the writer had written of them). Returns the
        rows and the change-feed sequence the export is consistent at."""
        with self._lock:
            ids, rows = self.unsaved_rows(touched=True)
            checkpoint()
            return ids, rows, self.changes.last

    def read_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, exists) of unique `ids` as they are now, read without counting an access (for
        delta exports: reading a row to replicate it is not a use of it)."""
        with self._lock:
            rows, _slots, exists = self._rows_now(ids)
            return rows, exists

    # --- bulk changes: import, sweeps, archive, drop --------------------------------

    def ingest(self, files: list[str], replace: bool, rows: int, ranges: np.ndarray = NO_RANGES,
               distinct: bool = False) -> None:
        """Apply staged SST files in one atomic ingest (after removing every row, with `replace`).
        Cached changes reach RocksDB first; then imported rows win: cached copies of ids in the
        imported `ranges` are dropped (every cached row, with `replace`), and the change feed
        records the ranges. The writer does the writes. `distinct`: the `rows` have distinct ids,
        so a table that counts rows and had none left (`replace`, or empty) now has exactly
        `rows`, no key scan needed."""
        self.flush()
        with self._lock:
            self._check_writable()
            self._settle()
            rocks, family = self.rocks, self.family

            # a merge into a table that counts rows: the count moves by the keys the import's
            # ranges gained (scanned before and after; the rest of the table is not read)
            merging = self.eviction.counts_rows and not replace and self.eviction.rows > 0
            bounds = _key_bounds(ranges) if merging else []
            before = rocks.count_keys_in(family, bounds) if merging else 0

            def perform() -> None:
                # a range tombstone under the new files makes RocksDB place them in level 0 and
                # then rewrite every imported row into the last level: only an old row needs it
                if replace and not rocks.is_empty(family):
                    rocks.delete_all(family)
                if files:
                    rocks.ingest(family, files)
            self._run_job(perform, "import", rows)
            if replace:
                self.cache.clear()
                self.lower.clear()
            else:                                  # a merge: only the cached copies it overwrote go
                for tier in (self.cache, self.lower):
                    cached = tier.cached_ids()
                    tier.invalidate(cached[covers(ranges, cached)])
            if self.eviction.counts_rows:          # exact row count for eviction triggers
                if merging:
                    self.eviction.rows += rocks.count_keys_in(family, bounds) - before
                else:                              # the table is now the import's rows alone
                    self.eviction.rows = rows if distinct else rocks.count_keys(family)
                self._save_row_count()
            self.changes.imported(self.name, ranges, replaced=replace)
            self.counters["rows_imported"] += rows

    def refresh_rows(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Overwrite stored `rows` of `ids` with their cached copies, whose headers are fresher."""
        with self._lock:
            slots = self.cache.probe(ids)
            cached = slots >= 0
            rows[cached] = self.cache.rows(slots[cached])
            rest = np.flatnonzero(~cached)
            below = self.layout.empty(len(rest))
            held, _ = self.lower.read(ids[rest], below)
            rows[rest[held]] = below[held]

    def sweep_rows(self, ids: np.ndarray, judged: np.ndarray, victim: np.ndarray, counts: np.ndarray,
                   fingerprint: Callable[[np.ndarray], np.ndarray], now: float) -> np.ndarray:
        """Apply a sweep's verdict on unique `ids`: remove `victim` rows (to the archive, when the
        table keeps one) and write the decayed access `counts` of the others, each only if the
        row is still byte for byte what the sweep judged (`fingerprint(row) == judged`): a row
        written or read since is left alone. Returns which ids were removed."""
        with self._lock:
            self._check_writable()
            current, slots, exists = self._rows_now(ids)
            same = exists & (fingerprint(current) == judged)
            gone, rewrite = same & victim, same & ~victim
            self.layout.header(current)["count"][rewrite] = counts[rewrite]
            self._sweep_write(ids[rewrite], current[rewrite], ids[gone], current[gone], now)
            hit = slots[rewrite] >= 0            # publish: decayed headers, now in sync with RocksDB
            in_cache = slots[rewrite][hit]
            self.cache.write_rows(in_cache, current[rewrite][hit])
            self.cache.set_dirty(in_cache, False)
            self.eviction.synced(self.cache, in_cache)
            self.cache.invalidate(ids[gone])
            self.lower.forget(ids[same])              # RocksDB now has what the tier below held
            self.changes.record(self.name, ids[gone])
            self.eviction.removed(int(gone.sum()))
            return gone

    def _sweep_write(self, ids, rows, victims, victim_rows, now: float) -> None:
        if not len(ids) and not len(victims):
            return
        rocks, family, layout = self.rocks, self.family, self.layout
        archive_rows = bool(self.config.eviction.archive_seconds and len(victims))

        def perform() -> None:
            if archive_rows:
                rocks.write(self.archive_family, encode_keys(victims), archive.encode(victim_rows, now))
            rocks.write(family, encode_keys(ids), layout.to_values(rows), encode_keys(victims))
        self._run_job(perform, "sweep", len(ids) + len(victims))
        if archive_rows:
            self.counters["archived_rows"] += len(victims)

    def purge_archive(self, keys: list[bytes]) -> None:
        """Delete archived rows (their retention ended)."""
        rocks, family = self.rocks, self.archive_family
        self._run_job(lambda: rocks.write(family, [], delete=keys), "archive purge", len(keys))

    def restore_archived(self, ids, now: float) -> int:
        """Put archived rows of `ids` back, unless the id has a row again (a live row is never
        overwritten). Restored rows count as accessed now. Returns rows restored."""
        if not self.config.eviction.archive_seconds:
            raise FailedPrecondition(f"table: {self.name!r} keeps no archive (eviction.archive_seconds is 0)")
        ids = np.unique(self._ids(ids))
        with self._lock:
            self._check_writable()
            ids = ids[~self._existing(ids)]
            keys = encode_keys(ids)
            values = self.rocks.get(self.archive_family, keys)
            found = [i for i, v in enumerate(values) if v is not None]
            if not found:
                return 0
            _, rows = archive.decode([values[i] for i in found], self.layout.row_bytes)
            self.layout.header(rows)["last_access"] = int(now)
            found_keys = [keys[i] for i in found]
            rocks, family, archived = self.rocks, self.family, self.archive_family

            def perform() -> None:
                rocks.write(family, found_keys, self.layout.to_values(rows))
                rocks.write(archived, [], delete=found_keys)
            self._run_job(perform, "archive restore", len(found))
            self.changes.record(self.name, ids[found])
            self.eviction.created(len(found))
            self.counters["rows_restored"] += len(found)
            return len(found)

    def drop(self) -> None:
        """Stop every write to this table and wait until the writer holds none of its rows;
        the store then removes its column families."""
        with self._lock:
            self.writer.check()
            self._dropped = True
            self.pending.wait_for_all()

    def add_counters(self, counts: dict[str, float], last: dict[str, float] | None = None) -> None:
        """Add to the table's counters (and set `last` ones), e.g. from a sweep."""
        with self._lock:
            for key, value in counts.items():
                self.counters[key] += value
            for key, value in (last or {}).items():
                self.counters[key] = value

    def row_count(self) -> int | None:
        """Exact rows of a table that counts them (a row limit or trigger), else None."""
        return self.eviction.rows

    def stats(self) -> dict[str, float]:
        with self._lock:
            counters = {k: float(v) for k, v in self.counters.items()}
            counters["cache_rows"] = float(self.cache.occupancy())
            counters["cache_capacity"] = float(self.cache.capacity)
            counters["cache_dirty_rows"] = float(self.cache.dirty_rows())
            counters["cache_locked_rows"] = float(self.cache.locked_rows())
            counters["pending_rows"] = float(len(self.pending))
            counters.update(self.lower.stats())
            counters["estimated_rows"] = float(self.rocks.estimate_rows(self.family))
            if self.eviction.rows is not None:
                counters["rows"] = float(self.eviction.rows)    # exact, for tables with a row limit
            return counters


def _key_bounds(ranges: np.ndarray) -> list[tuple[bytes, bytes]]:
    """RocksDB key bounds (lo, hi) of closed id ranges (keys sort as their ids do)."""
    if not len(ranges):
        return []
    return list(zip(encode_keys(ranges[:, 0]), encode_keys(ranges[:, 1]), strict=True))
