"""One background writer per store, and the rows waiting for it.

Every RocksDB write that is not the reply to a call (write-back flushes, dirty
victims, sweeps, import commits, archive) is a `WriteJob` on one bounded queue,
performed by one thread in the order it was queued (Redis's bio jobs). A full
queue makes the caller wait; nothing is dropped. Jobs are queued under their
table's lock, so per table the queue order is the order of the table's changes;
the writer itself never takes a table lock, so a caller may wait for it while
holding one.

Rows handed to the writer and not yet in RocksDB sit in their table's
`PendingRows`: a read that misses the cache looks there before RocksDB, so a
row is never invisible between leaving the cache and reaching the database.

A write error (a full disk) puts the writer in a fault state: `fault` names it,
`on_fault` callbacks hear of it and of its end, and the failed job is retried,
after reopening the database, until it succeeds (no job is skipped, so no
acknowledged row is lost). A second thread, the flusher, starts a write-back
flush of each table every `flush_seconds`.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from .errors import StorageError, StorageFault, StoreClosed
from .rocks_tier import FamilyNotFound, RocksTier
from .thread_names import os_named

log = logging.getLogger(__name__)

QUEUE_JOBS = 64              # jobs waiting at most; callers wait beyond it
RETRY_SECONDS = 0.5          # between attempts while the database refuses writes
FLUSH_POLL_MIN = 0.005
FLUSH_POLL_MAX = 0.1         # a new table waits at most this long for its first look


def fault_error(reason: str) -> StorageFault:
    """The error a refused write gets: the cause in plain words (RocksDB's text has paths)."""
    if "No space left" in reason:
        cause = "the disk is full (no space left on device)"
    elif "Read-only file system" in reason:
        cause = "the disk is read-only"
    else:
        cause = "the database failed a write (I/O error; the server log has RocksDB's message)"
    return StorageFault(f"storage: writes are refused until the store recovers: {cause}")


class PendingRows:
    """Rows queued for RocksDB, newest last. Added under the table lock; removed by the writer."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []   # (sorted ids, order, rows)

    def __len__(self) -> int:
        return sum(len(ids) for ids, _, _ in self._batches)

    def __bool__(self) -> bool:
        return bool(self._batches)

    def add(self, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Queue a batch; returns its entry: (ids sorted, the order that sorts them, rows). The
        sort is stable: an id's rows keep their order, so writing in key order, the last still wins."""
        order = np.argsort(ids, kind="stable")
        entry = (ids[order], order, rows)
        with self._cond:
            self._batches.append(entry)
        return entry

    def remove(self, entry: object) -> None:
        with self._cond:
            self._batches = [b for b in self._batches if b is not entry]
            self._cond.notify_all()

    def find(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Copy the newest pending row of each id into `rows`; returns which ids had one."""
        found = np.zeros(len(ids), dtype=bool)
        with self._cond:
            batches = list(self._batches)
        for sorted_ids, order, batch_rows in reversed(batches):
            want = np.flatnonzero(~found)
            if not len(want):
                break
            at = np.minimum(np.searchsorted(sorted_ids, ids[want]), len(sorted_ids) - 1)
            hit = sorted_ids[at] == ids[want]
            rows[want[hit]] = batch_rows[order[at[hit]]]
            found[want[hit]] = True
        return found

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) of every pending batch, oldest first (a later row of an id wins)."""
        with self._cond:
            batches = list(self._batches)
        ids = []
        for sorted_ids, order, _ in batches:
            original = np.empty_like(sorted_ids)
            original[order] = sorted_ids
            ids.append(original)
        if not batches:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.uint8)
        return np.concatenate(ids), np.concatenate([rows for _, _, rows in batches])

    def wait_for_all(self) -> None:
        with self._cond:
            while self._batches:
                self._cond.wait()

    def wait_for(self, ids: np.ndarray) -> None:
        """Return once no pending batch holds any of `ids` (a direct write must not be overtaken)."""
        with self._cond:
            while any(np.isin(ids, sorted_ids).any() for sorted_ids, _, _ in self._batches):
                self._cond.wait()


@dataclass(eq=False)
class WriteJob:
    """One RocksDB write the writer performs; `wait` returns when it is done."""

    rocks: RocksTier
    perform: Callable[[], None]
    what: str                                   # for logs: "flush of table 't' (4096 rows)"
    rows: int = 0
    on_done: Callable[[], None] | None = None
    error: BaseException | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        if self.on_done is not None:        # also on error: the rows are not coming, stop serving them
            self.on_done()
        self._done.set()


class Writer:
    def __init__(self, queue_jobs: int = QUEUE_JOBS, retry_seconds: float = RETRY_SECONDS):
        self.retry_seconds = retry_seconds
        self.fault: str | None = None
        self.unsaved_rows = 0                  # rows given up on at close (the database refused them)
        self.jobs_done = 0
        self._callbacks: list[Callable[[str | None], None]] = []
        self._queue: queue.Queue[WriteJob | None] = queue.Queue(queue_jobs)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._faulty_rocks: RocksTier | None = None
        self._thread = threading.Thread(target=os_named(self._run), name="kvstore-writer", daemon=True)
        self._thread.start()

    # --- callers ---------------------------------------------------------------

    def on_fault(self, callback: Callable[[str | None], None]) -> None:
        """Call `callback(reason)` when a fault starts and `callback(None)` when it ends."""
        self._callbacks.append(callback)

    def submit(self, job: WriteJob) -> WriteJob:
        """Queue a job (waits while the queue is full)."""
        if not self._thread.is_alive():
            raise StoreClosed("store: closed")
        self._queue.put(job)
        return job

    def run(self, job: WriteJob) -> None:
        """Queue a job and wait until it is written."""
        self.submit(job).wait()

    def drain(self) -> None:
        """Return once every job queued so far is done."""
        if self._thread.is_alive():
            self.run(WriteJob(None, lambda: None, "drain"))     # jobs run in order

    def report(self, rocks: RocksTier, exc: StorageError) -> None:
        """A write outside the writer failed: enter the fault state; the writer recovers."""
        self._faulty_rocks = rocks
        self._set_fault(str(exc))

    def check(self) -> None:
        """Raise StorageFault (UNAVAILABLE) while in the fault state: writes are refused."""
        fault = self.fault
        if fault is not None:
            raise fault_error(fault)

    def stopping(self) -> None:
        """From now on a job that fails is tried once more (after a reopen), then given up and logged."""
        self._stopping.set()

    def close(self) -> None:
        """Write what is queued (one more try each while faulty), then stop."""
        if not self._thread.is_alive():
            return
        self._stopping.set()
        self._queue.put(None)
        self._thread.join()

    # --- the thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=self.retry_seconds)
            except queue.Empty:
                if self.fault is not None and self._faulty_rocks is not None:
                    self._recover(self._faulty_rocks)
                continue
            if job is None:
                return
            self._perform(job)

    def _perform(self, job: WriteJob) -> None:
        while True:
            error = self._attempt(job)
            if error is None:
                self.jobs_done += 1
                if job.rocks is not None and self.fault is not None:
                    self._set_fault(None)
                job.finish()
                return
            if not isinstance(error, StorageError):
                job.finish(None if isinstance(error, FamilyNotFound) else error)
                return
            # Out of the except block: no traceback pins the database handle the reopen must drop.
            self._faulty_rocks = job.rocks
            self._set_fault(str(error))
            if self._stopping.is_set() and not self._recover(job.rocks):
                self.unsaved_rows += job.rows
                log.error("could not save %s at shutdown: %s", job.what, error)
                job.finish(error)
                return
            if not self._stopping.wait(self.retry_seconds):
                self._recover(job.rocks, probe=False)

    @staticmethod
    def _attempt(job: WriteJob) -> BaseException | None:
        """Run a job once; the error (its traceback dropped), or None. A dropped table's job is done."""
        try:
            job.perform()
        except FamilyNotFound as exc:         # its table was dropped: nothing left to write
            return exc.with_traceback(None)
        except StorageError as exc:
            return exc.with_traceback(None)
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the writer: the caller hears of it
            log.exception("write job failed: %s", job.what)
            return exc.with_traceback(None)
        return None

    def _recover(self, rocks: RocksTier, probe: bool = True) -> bool:
        """Reopen the database (once the disk has room) and, with `probe`, prove it takes writes."""
        if not rocks.has_room():
            return False
        try:
            rocks.reopen()
            if probe:
                rocks.probe_write()
        except StorageError as exc:
            log.warning("storage still failing: %s", exc)
            return False
        if probe:
            self._set_fault(None)
        return True

    def _set_fault(self, reason: str | None) -> None:
        with self._lock:
            if (self.fault is None) == (reason is None):
                return
            self.fault = reason
        if reason is None:
            log.warning("storage recovered: writes accepted again")
        else:
            log.error("storage fault, writes refused until it clears: %s", reason)
        for callback in list(self._callbacks):
            callback(reason)


class Flusher:
    """Starts a write-back flush of every table at least every `flush_seconds` (its own thread:
    a flush takes table locks, which the writer thread must never wait for)."""

    def __init__(self, tables: Callable[[], Iterable], writer: Writer, clock: Callable[[], float] = time.monotonic):
        self._tables = tables
        self._writer = writer
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=os_named(self._run), name="kvstore-flusher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            poll = FLUSH_POLL_MAX
            for table in list(self._tables()):
                period = table.flush_seconds
                if period is None:
                    continue
                due = table.last_flush + period - self._clock()
                if due <= 0 and self._writer.fault is None:
                    try:
                        table.flush()
                    except Exception:  # noqa: BLE001 - a dropped table or a closed store: try the others
                        log.debug("background flush of %r skipped", table.name, exc_info=True)
                    due = period
                poll = min(poll, max(due, FLUSH_POLL_MIN))
            self._stop.wait(poll)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
