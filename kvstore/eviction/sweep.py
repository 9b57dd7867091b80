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
from ..rows import decode_keys
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
        keys, values = table.rocks.scan(table.family, start, chunk_rows)
        if not keys:
            break
        start = keys[-1] + b"\0"
        limiter.acquire(len(keys))
        ids = decode_keys(keys)
        rows = layout.from_values(values)
        table.refresh_rows(ids, rows)           # cached copies carry the freshest headers
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
    """Remove victims and write decayed headers of rows still as judged (the table checks
    that, under its lock). Returns which rows were removed."""
    victim = reason >= 0
    touched = np.flatnonzero(victim | changed)
    gone = table.sweep_rows(ids[touched], prints[touched], victim[touched], counts[touched], fingerprint, now)
    for code, n in zip(*np.unique(reason[touched][gone], return_counts=True), strict=True):
        result.evicted[REASONS[code]] += int(n)
    removed = np.zeros(len(ids), dtype=bool)
    removed[touched[gone]] = True
    return removed


def _table_pass(table, rules, gathered, now, result) -> None:
    """Run table-scope rules over every surviving row; victims are checked like row victims."""
    meta = RowMeta.concat([m for m, _ in gathered])
    prints = np.concatenate([p for _, p in gathered]) if gathered else np.zeros(0, np.uint64)
    for rule in rules:
        for _ in range(4):                    # rows changed since the scan are skipped: pick others
            rows = table.row_count()
            meta.total = rows if rows is not None else len(meta)
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
    counts = {f"evicted_{reason}": n for reason, n in result.evicted.items()}
    counts.update(evicted_rows=sum(result.evicted.values()), sweeps=1, sweep_rows_scanned=result.scanned,
                  sweep_seconds_total=result.seconds, archive_purged=result.purged)
    table.add_counters(counts, last={"sweep_seconds_last": result.seconds})
