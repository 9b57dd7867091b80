"""The sweeper: one background thread per store that runs eviction sweeps.

A table is swept when its interval has passed (on the store's clock), when
its row count exceeds its row trigger, when its live SST bytes exceed its
byte trigger, or on demand (`Store.evict`). Every sweep, background or on
demand, draws from one rate limiter per store, so eviction never scans more
than `rows_per_second` rows however many tables need it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from ..config import SweeperConfig
from ..thread_names import os_named
from .sweep import SweepResult, sweep_table

log = logging.getLogger(__name__)


class RateLimiter:
    """Paces work to `rate` units per second: `acquire(n)` returns when n more units fit.
    A caller that falls behind (slow work between calls) may catch up by at most `slack_s`."""

    def __init__(self, rate: float, slack_s: float = 0.05,
                 monotonic: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.rate = rate
        self.slack_s = slack_s
        self._monotonic = monotonic
        self._sleep = sleep
        self._next = monotonic()
        self._lock = threading.Lock()

    def acquire(self, n: int) -> None:
        with self._lock:
            now = self._monotonic()
            start = max(self._next, now - self.slack_s)
            self._next = start + n / self.rate
            wait = self._next - now
        if wait > 0:
            self._sleep(wait)


class Sweeper:
    def __init__(self, tables: Callable[[], Iterable], config: SweeperConfig | None = None,
                 clock: Callable[[], float] = time.time):
        self.config = config or SweeperConfig()
        self.limiter = RateLimiter(self.config.rows_per_second)
        self.clock = clock
        self._tables = tables
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.config.enabled:
            self._thread = threading.Thread(target=os_named(self._run), name="kvstore-sweeper", daemon=True)
            self._thread.start()

    def sweep(self, table) -> SweepResult:
        """One sweep of `table` now, at the store's rate."""
        return sweep_table(table, self.limiter, self.config.chunk_rows, self._stop.is_set)

    def due(self, table) -> str | None:
        """Why `table` should be swept now (None: it need not be)."""
        config = table.config.eviction
        tracker = table.eviction
        if not config.sweeps:
            return None
        if tracker.last_sweep is None:
            tracker.last_sweep = self.clock()    # intervals count from when the sweeper first saw the table
        if config.interval_seconds and self.clock() - tracker.last_sweep >= config.interval_seconds:
            return "interval"
        if config.row_trigger and tracker.rows is not None and tracker.rows > config.row_trigger:
            return "rows"
        if config.trigger_bytes and table.rocks.live_bytes(table.family) > config.trigger_bytes:
            return "bytes"
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.config.poll_seconds):
            for table in list(self._tables()):
                if self._stop.is_set():
                    return
                try:
                    why = self.due(table)
                    if why:
                        self.sweep(table)
                        table.add_counters({f"sweeps_by_{why}": 1})
                except Exception:  # a dropped table or a storage error: keep sweeping the others
                    table.add_counters({"sweep_errors": 1})
                    log.exception("eviction sweep of table %r failed", table.name)

    def close(self) -> None:
        """Stop the thread; a sweep in progress stops at its next chunk."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
