"""One eviction sweep of one table.

The sweep first flushes the table (so every row is in RocksDB), then scans
the table's column family in key order, chunk by chunk, at the rate the
limiter allows. For each chunk it reads the cached copies of cached rows
(their headers are fresher), lets the row rules adjust headers (decay) and
select victims, and applies the result under the table lock: each chosen
row is read again and removed only if it is byte for byte the row the sweep
judged (a 64-bit fingerprint), so a row written or read after the sweep chose
it is never lost. Removal takes the row out of the cache first (a dirty
victim is dropped on purpose: it is the judged row, which goes to the
archive when there is one), then out of RocksDB. Table rules (capacity) run
after the scan over the metadata of every surviving row.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..initializer import splitmix64
from ..rows import decode_keys, encode_keys
from . import archive
from .rules import RowMeta

REASONS = ("ttl", "norm", "frequency", "capacity", "score")


@dataclass
class SweepResult:
    evicted: Counter = field(default_factory=Counter)   # reason -> rows removed
    scanned: int = 0
    seconds: float = 0.0
    purged: int = 0

    def counts(self) -> dict[str, int]:
        return {reason: int(self.evicted[reason]) for reason in REASONS}


def fingerprint(rows: np.ndarray) -> np.ndarray:
    """[n] uint64 hash of each row's bytes (rows are multiples of 16 bytes)."""
    words = np.ascontiguousarray(rows).view("<u8")
    weights = splitmix64(np.arange(words.shape[1], dtype=np.uint64)) | np.uint64(1)
    with np.errstate(over="ignore"):
        return (words * weights).sum(axis=1, dtype=np.uint64)


def sweep_table(table, limiter, chunk_rows: int = 2048, stopped=lambda: False) -> SweepResult:
    """Run every eviction rule of `table` once; see the module docstring for the promises."""
    tracker = table.eviction
    result = SweepResult()
    with tracker.sweep_lock:
        began = time.monotonic()
        now = table.clock()
        tracker.last_sweep = now

        def halted() -> bool:
            return stopped() or tracker.cancelled.is_set()

        row_rules = [r for r in tracker.rules if r.scope == "row"]
        table_rules = [r for r in tracker.rules if r.scope == "table"]
        gathered = []
        if tracker.rules:                      # a table without rules has nothing to scan for
            table.flush()
            gathered = _scan(table, limiter, chunk_rows, row_rules, bool(table_rules), now, result, halted)
        if table_rules and not halted():
            _table_pass(table, table_rules, gathered, now, result)
        if table.config.eviction.archive_seconds and not halted():
            result.purged = archive.purge(table, limiter, now, chunk_rows, halted)
        result.seconds = time.monotonic() - began
        _record(table, result)
    return result


def _scan(table, limiter, chunk_rows, rules, gather, now, result, halted) -> list[tuple[RowMeta, np.ndarray]]:
    layout = table.layout
    with_norm = any(r.needs_norm for r in rules)
    gathered = []
    start = None
    while not halted():
        keys, values = table.rocks.scan(table.name, start, chunk_rows)
        if not keys:
            break
        start = keys[-1] + b"\0"
        limiter.acquire(len(keys))
        ids = decode_keys(keys)
        rows = layout.from_values(values)
        with table._lock:                      # cached copies carry the freshest headers
            slots = table.cache.probe(ids)
            cached = slots >= 0
            rows[cached] = table.cache.slab[slots[cached]]
        prints = fingerprint(rows)
        meta = RowMeta.of(layout, ids, rows, with_norm)
        changed = np.zeros(len(ids), dtype=bool)
        for rule in rules:
            changed |= rule.adjust(meta)
        reason = np.full(len(ids), -1, dtype=np.int64)
        for rule in rules:
            reason = np.where((reason < 0) & rule.select(meta, now), REASONS.index(rule.reason), reason)
        removed = np.zeros(len(ids), dtype=bool)
        if (reason >= 0).any() or changed.any():
            removed = _apply(table, ids, prints, reason, changed, meta.count, now, result)
        result.scanned += len(ids)
        if gather:
            keep = ~removed
            gathered.append((meta.take(keep), _refreshed(prints, rows, changed, meta.count, layout)[keep]))
    return gathered


def _refreshed(prints, rows, changed, counts, layout) -> np.ndarray:
    """Fingerprints as they are after decayed counts were written back."""
    if not changed.any():
        return prints
    rows = rows[changed]
    layout.header(rows)["count"] = counts[changed]
    prints = prints.copy()
    prints[changed] = fingerprint(rows)
    return prints


def _apply(table, ids, prints, reason, changed, counts, now, result) -> np.ndarray:
    """Under the table lock: remove victims and write decayed headers of rows still as judged.
    Returns which rows were removed."""
    layout = table.layout
    victim = reason >= 0
    touched = victim | changed
    with table._lock:
        current, slots, exists = _current_rows(table, ids[touched])
        same = exists & (fingerprint(current) == prints[touched])
        gone = same & victim[touched]
        rewrite = same & ~victim[touched] & changed[touched]
        # decayed headers: written to RocksDB and to the cached copy, which is then in sync
        if rewrite.any():
            layout.header(current)["count"][rewrite] = counts[touched][rewrite]
            table.rocks.write(table.name, encode_keys(ids[touched][rewrite]), layout.to_values(current[rewrite]))
            in_cache = slots[rewrite]
            hit = in_cache >= 0
            table.cache.slab[in_cache[hit]] = current[rewrite][hit]
            table.cache.dirty[in_cache[hit]] = False
            table.eviction.synced(table.cache.slab, in_cache[hit])
        if gone.any():
            victims = ids[touched][gone]
            if table.config.eviction.archive_seconds:
                table.rocks.write(archive.archive_family(table.name), encode_keys(victims),
                                  archive.encode(current[gone], now))
                table.counters["archived_rows"] += len(victims)
            table.cache.invalidate(victims)
            table.rocks.write(table.name, [], delete=encode_keys(victims))
            table.changes.record(table.name, victims)
            table.eviction.removed(len(victims))
            for code, n in zip(*np.unique(reason[touched][gone], return_counts=True), strict=True):
                result.evicted[REASONS[code]] += int(n)
    removed = np.zeros(len(ids), dtype=bool)
    removed[np.flatnonzero(touched)[gone]] = True
    return removed


def _current_rows(table, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cache slots, exists) of `ids` as they stand now. Call under the table lock."""
    rows = table.layout.empty(len(ids))
    slots = table.cache.probe(ids)
    cached = slots >= 0
    rows[cached] = table.cache.slab[slots[cached]]
    exists = cached.copy()
    if (~cached).any():
        values = table.rocks.get(table.name, encode_keys(ids[~cached]))
        present = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
        if present.any():
            sub = np.flatnonzero(~cached)[present]
            rows[sub] = table.layout.from_values([v for v in values if v is not None])
        exists[np.flatnonzero(~cached)] = present
    return rows, slots, exists


def _table_pass(table, rules, gathered, now, result) -> None:
    """Run table-scope rules over every surviving row; victims are checked like row victims."""
    meta = RowMeta.concat([m for m, _ in gathered])
    prints = np.concatenate([p for _, p in gathered]) if gathered else np.zeros(0, np.uint64)
    for rule in rules:
        for _ in range(4):                    # rows changed since the scan are skipped: pick others
            with table._lock:
                meta.total = table.eviction.rows if table.eviction.rows is not None else len(meta)
            pick = np.flatnonzero(rule.select(meta, now))
            if not len(pick):
                break
            reason = np.full(len(pick), REASONS.index(rule.reason))
            no_change = np.zeros(len(pick), dtype=bool)
            removed = np.zeros(len(pick), dtype=bool)
            for lo in range(0, len(pick), 8192):
                part = slice(lo, lo + 8192)
                removed[part] = _apply(table, meta.ids[pick[part]], prints[pick[part]], reason[part],
                                       no_change[part], meta.count[pick[part]], now, result)
            keep = np.ones(len(meta), dtype=bool)
            keep[pick] = False                # removed, or changed since the scan (recently used)
            meta, prints = meta.take(keep), prints[keep]
            if removed.all():
                break


def _record(table, result: SweepResult) -> None:
    with table._lock:
        counters = table.counters
        for reason, n in result.evicted.items():
            counters[f"evicted_{reason}"] += n
            counters["evicted_rows"] += n
        counters["sweeps"] += 1
        counters["sweep_rows_scanned"] += result.scanned
        counters["sweep_seconds_total"] += result.seconds
        counters["sweep_seconds_last"] = result.seconds
        counters["archive_purged"] += result.purged
