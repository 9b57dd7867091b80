"""What a table keeps between sweeps for store eviction.

Access metadata: every lookup, update and gradient step records an access in
the row's header (count + 1, last_access = now), in the slab for cached rows: a
lookup reads that row's first cache line anyway, so the write costs no extra
memory traffic. A hit does not mark the row dirty, so reads stay free of
RocksDB writes. Instead the tracker remembers, per cache slot, the header
RocksDB holds; a clean row whose last_access moved on by `touch_seconds`, or
whose count more than doubled, is "stale" and is written back when it leaves
the cache and at flush. So RocksDB's headers lag the truth by at most
`touch_seconds` (and a factor 2 in count), while a row stays cached the sweeper
reads its header from the slab, and tables without eviction rules never write
for reads at all.

Row count: tables with a capacity limit or row trigger count their rows
exactly (one key scan when the table is opened, then +created, -deleted,
-evicted), so triggers and capacity sweeps need no estimate.
"""
from __future__ import annotations

import threading
from functools import cached_property

import numpy as np

from ..config import EvictionConfig
from ..errors import InvalidArgument
from ..rows import RowLayout
from .admission import Admission
from .rules import build_rules, touch_headers


class EvictionTracker:
    def __init__(self, config: EvictionConfig, layout: RowLayout, cache_slots: int):
        self.config = config
        self.layout = layout
        self.rules = build_rules(config)
        self.admission = Admission(config.min_count, config.sketch_width)
        self.persist_touches = config.sweeps
        self.cache_slots = cache_slots
        self.rows: int | None = None          # exact row count where counts_rows
        self.sweep_lock = threading.Lock()    # one sweep of a table at a time
        self.cancelled = threading.Event()    # set when the table is dropped: sweeps stop
        self.last_sweep: float | None = None  # clock time the last sweep started

    # Per-slot host arrays, allocated on first use (only tables with eviction rules use them).

    @cached_property
    def synced_access(self) -> np.ndarray:     # last_access RocksDB holds for the cached row
        return np.zeros(self.cache_slots, dtype=np.uint32)

    @cached_property
    def synced_count(self) -> np.ndarray:      # count RocksDB holds for the cached row
        return np.zeros(self.cache_slots, dtype=np.uint32)

    @property
    def counts_rows(self) -> bool:
        return bool(self.config.max_rows or self.config.trigger_rows)

    # --- access metadata ---------------------------------------------------------

    def synced(self, tier, slots: np.ndarray) -> None:
        """The rows in cache `slots` of `tier` now match RocksDB (just loaded or written back)."""
        if not self.persist_touches or len(slots) == 0:
            return
        self.synced_access[slots], self.synced_count[slots] = tier.headers(slots)

    def stale(self, tier, slots: np.ndarray) -> np.ndarray:
        """Which clean rows in cache `slots` of `tier` carry access metadata RocksDB should get."""
        if not self.persist_touches or len(slots) == 0:
            return np.zeros(len(slots), dtype=bool)
        access, count = tier.headers(slots)
        return self._moved(access, count, self.synced_access[slots], self.synced_count[slots])

    def touch_uncached(self, rows: np.ndarray, now: float) -> np.ndarray:
        """Record an access in rows read from RocksDB that found no cache slot; returns
        which of them RocksDB should get back (their metadata moved far enough)."""
        header = self.layout.header(rows)
        before_access, before_count = header["last_access"].copy(), header["count"].copy()
        touch_headers(rows, np.arange(len(rows)), int(now))
        if not self.persist_touches:
            return np.zeros(len(rows), dtype=bool)
        return self._moved(header["last_access"], header["count"], before_access, before_count)

    def _moved(self, access, count, synced_access, synced_count) -> np.ndarray:
        moved = access.astype(np.int64) - synced_access >= self.config.touch_seconds
        return moved | (count.astype(np.int64) > 2 * synced_count.astype(np.int64) + 1)

    # --- row count ---------------------------------------------------------------

    def created(self, n: int) -> None:
        if self.rows is not None:
            self.rows += int(n)

    def removed(self, n: int) -> None:
        if self.rows is not None:
            self.rows = max(0, self.rows - int(n))


def check_scores(scores, n: int) -> np.ndarray | None:
    """Client feature scores of a batch: n finite numbers, or None."""
    if scores is None:
        return None
    scores = np.asarray(scores)
    if scores.shape != (n,) or scores.dtype.kind not in "fiu":
        raise InvalidArgument(f"scores: expected {n} numbers (one per id), got shape {scores.shape}")
    scores = scores.astype(np.float32)
    if not np.isfinite(scores).all():
        raise InvalidArgument("scores: contains NaN or Inf")
    return scores
