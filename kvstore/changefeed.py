"""The change feed: a bounded, in-memory log of which ids every applied write touched.

Each applied write (update, apply_gradients, delete, import commit, store
eviction, archive restore) appends one entry (sequence, table, ids, time) while
it still holds its table's lock (an import: the id ranges it covered, not its
ids, so its memory does not grow with its rows), so a reader that takes the table lock and reads
`last` knows every change of that table up to `last` is in the table. Rows are
not kept: a subscriber or a delta export reads them when it sends, so a hot row
changed many times in an interval is sent once, with its latest value (or as a
tombstone when it no longer exists).

Sequence numbers are store-wide and only grow, across restarts too: they are
handed out from a block reserved in `<data-dir>/changefeed.json` (one fsync'd
write per `RESERVE` sequences). A graceful close records the last sequence, so a
follower that had everything up to it resumes after the restart; after a crash
the feed restarts above the whole reserved block, so every follower
re-bootstraps (write-back tables may have lost recent rows). The log keeps the
newest `window_rows` ids; `floor` is the oldest sequence a reader may resume
from (it has every change after it).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from .errors import FailedPrecondition, InvalidArgument
from .id_ranges import NO_RANGES, coalesce

STATE_FILE = "changefeed.json"
RESERVE = 1 << 20          # sequences handed out per persisted reservation
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChangeFeedConfig:
    """How much history the feed keeps: resuming or a delta export needs its start inside it."""

    window_rows: int = 1 << 22      # ids kept (8 bytes each), across every table

    def __post_init__(self):
        if isinstance(self.window_rows, bool) or not isinstance(self.window_rows, int) or self.window_rows < 1:
            raise InvalidArgument(f"window_rows: must be a positive integer, got {self.window_rows!r}")


class OutsideWindow(FailedPrecondition):
    """A reader asked for changes the feed no longer holds (or never handed out)."""

    reason = "outside_window"

    def __init__(self, field: str, sequence: int, floor: int, last: int):
        super().__init__(f"{field}: sequence {sequence} is outside the change feed's window: the oldest "
                         f"available sequence is {floor} and the latest {last}; re-bootstrap from a full export")
        self.sequence, self.oldest, self.last = sequence, floor, last


@dataclass
class Entry:
    sequence: int
    table: str
    ids: np.ndarray
    time: float
    dropped: bool = False            # the table was dropped (ids empty): followers drop it too
    ranges: np.ndarray = field(default_factory=lambda: NO_RANGES)   # [R, 2] id ranges of a merge import

    @property
    def size(self) -> int:
        """What the entry holds, in ids (a range counts as one), for the window."""
        return len(self.ids) + len(self.ranges)


@dataclass
class Changes:
    """Ids changed per table in (since, through]; `first_time` is when the oldest of them was recorded.
    `dropped`: tables dropped in that range (a table of that name that exists now was created after).
    `ranges`: per table, [R, 2] id ranges merge imports covered: any id in them may have changed."""

    since: int
    through: int
    ids: dict[str, np.ndarray]
    first_time: float | None
    dropped: set[str] = field(default_factory=set)
    ranges: dict[str, np.ndarray] = field(default_factory=dict)

    def tables(self) -> list[str]:
        """Tables with changed rows (ids or ranges), sorted."""
        return sorted(set(self.ids) | set(self.ranges))


class Cursor:
    """One subscriber's position: every change up to `sequence` has been sent to it."""

    def __init__(self, sequence: int, tables: frozenset[str] | None):
        self.sequence = sequence
        self.tables = tables


class ChangeFeed:
    def __init__(self, data_dir: str | None, config: ChangeFeedConfig | None = None,
                 clock: Callable[[], float] = time.time):
        self.config = config or ChangeFeedConfig()
        self.clock = clock
        self._path = os.path.join(data_dir, STATE_FILE) if data_dir else None
        self._cond = threading.Condition()
        self._entries: deque[Entry] = deque()
        self._rows = 0                        # ids held by _entries
        self._cursors: set[Cursor] = set()
        self._watchers: set[Callable[[], None]] = set()
        self._closed = False
        self._ending = False                  # subscriptions end (server shutting down)
        self.subscribers_dropped = 0                      # subscribers refused or cut off: outside the window
        self.feed_id, self.last = self._load()
        self.floor = self.last
        self._reserved = self.last
        self._reserve(self.last + 1)

    # --- persistence ---------------------------------------------------------

    def _load(self) -> tuple[str, int]:
        """(feed id, first sequence): the recorded last one after a clean close, above the reservation after
        a crash (so no sequence is ever handed out twice and followers of the lost run re-bootstrap)."""
        if self._path is None or not os.path.exists(self._path):
            return uuid.uuid4().hex, 0
        try:
            with open(self._path) as src:
                saved = json.load(src)
            return str(saved["feed_id"]), int(saved["sequence"]) + (0 if saved["clean"] else 1)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FailedPrecondition(f"data_dir: cannot read {STATE_FILE}: {exc}") from None

    def _save(self, sequence: int, clean: bool) -> None:
        if self._path is None:
            return
        tmp = self._path + ".tmp"
        with open(tmp, "w") as out:
            json.dump({"feed_id": self.feed_id, "sequence": sequence, "clean": clean}, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._path)

    def _reserve(self, sequence: int) -> None:
        if sequence > self._reserved:
            self._reserved = sequence + RESERVE
            self._save(self._reserved, clean=False)

    # --- writers -------------------------------------------------------------

    def record(self, table: str, ids: np.ndarray) -> int:
        """Append one applied write of `ids` (call while holding the table's lock); returns its sequence."""
        if not len(ids):
            return self.last
        return self._append(Entry(0, table, ids, 0.0))

    def table_dropped(self, table: str) -> int:
        """The table was dropped (call while holding its lock): followers drop their copy."""
        return self._append(Entry(0, table, np.zeros(0, np.int64), 0.0, dropped=True))

    def _append(self, entry: Entry) -> int:
        with self._cond:
            self._reserve(self.last + 1)
            self.last += 1
            entry.sequence, entry.time = self.last, self.clock()
            self._entries.append(entry)
            self._rows += entry.size
            while self._rows > self.config.window_rows and len(self._entries) > 1:
                oldest = self._entries.popleft()
                self._rows -= oldest.size
                self.floor = oldest.sequence
            self._notify()
            return self.last

    def imported(self, table: str, ranges: np.ndarray, replaced: bool) -> None:
        """An import commit: one entry of the id ranges it covered (readers re-read those rows),
        whatever its size; a replace import also removed rows the log cannot list."""
        if replaced:
            self.reset()
        elif len(ranges):
            self._append(Entry(0, table, np.zeros(0, np.int64), 0.0, ranges=ranges))

    def reset(self) -> None:
        """Every table may have changed in ways the log cannot list (a snapshot restore, a replace
        import): readers of earlier sequences must re-bootstrap."""
        with self._cond:
            self._reserve(self.last + 1)
            self.last += 1
            self.floor = self.last
            self._entries.clear()
            self._rows = 0
            self._notify()

    def close(self, clean: bool = True) -> None:
        """Record the last sequence as clean (call after the final flush; not `clean`: rows were lost,
        followers re-bootstrap after the restart) and end every wait."""
        with self._cond:
            if not self._closed:
                self._closed = self._ending = True
                try:
                    if clean:
                        self._save(self.last, clean=True)
                except OSError as exc:      # e.g. a full disk: the next start re-bootstraps followers, as after a crash
                    log.error("closing the change feed: cannot record its last sequence: %s", exc)
            self._notify()

    def end_subscriptions(self) -> None:
        """Wake every waiting subscriber for good: the server is stopping."""
        with self._cond:
            self._ending = True
            self._notify()

    # --- readers -------------------------------------------------------------

    def check(self, sequence: int, field: str = "from_sequence") -> None:
        """Raise OutsideWindow unless every change after `sequence` is still held."""
        if not self.floor <= sequence <= self.last:
            raise OutsideWindow(field, sequence, self.floor, self.last)

    def changes(self, since: int, tables: Iterable[str] | None = None, field: str = "from_sequence") -> Changes:
        """Unique ids changed after `since`, per table (only `tables`, when given)."""
        wanted = None if tables is None else set(tables)
        with self._cond:
            self.check(since, field)
            through = self.last
            start = since + 1 - self._entries[0].sequence if self._entries else 0
            picked = [e for e in _islice(self._entries, start) if wanted is None or e.table in wanted]
        first_time = picked[0].time if picked else None
        by_table: dict[str, list[np.ndarray]] = {}
        spans: dict[str, list[np.ndarray]] = {}
        dropped = set()
        for entry in picked:
            if entry.dropped:                   # rows before the drop belong to the old table: forget them
                by_table[entry.table], spans[entry.table] = [], []
                dropped.add(entry.table)
            elif len(entry.ranges):
                spans.setdefault(entry.table, []).append(entry.ranges)
            else:
                by_table.setdefault(entry.table, []).append(entry.ids)
        ids = {table: np.unique(np.concatenate(parts)) for table, parts in by_table.items() if parts}
        ranges = {table: coalesce(np.concatenate(parts)) for table, parts in spans.items() if parts}
        return Changes(since, through, ids, first_time, dropped, ranges)

    def wait_beyond(self, sequence: int, timeout: float) -> bool:
        """Block until a change after `sequence` exists (True), the timeout passes or the feed closes."""
        with self._cond:
            return self._cond.wait_for(lambda: self.last > sequence or self._ending, timeout) and not self._ending

    @property
    def ending(self) -> bool:
        return self._ending

    def watch(self, wake: Callable[[], None]) -> None:
        """Call `wake()` after every change and when subscriptions end, so an event loop can wait for
        changes without a thread blocked in `wait_beyond`. It runs on the writer's thread holding the
        feed's lock: it must only hand the news on (e.g. `loop.call_soon_threadsafe`)."""
        with self._cond:
            self._watchers.add(wake)

    def unwatch(self, wake: Callable[[], None]) -> None:
        with self._cond:
            self._watchers.discard(wake)

    def _notify(self) -> None:
        self._cond.notify_all()
        for wake in self._watchers:
            wake()

    # --- subscribers ---------------------------------------------------------

    def subscribe(self, sequence: int, tables: Iterable[str] | None = None) -> Cursor:
        """A cursor for one subscriber starting after `sequence`; OutsideWindow (counted as dropped) if gone."""
        with self._cond:
            try:
                self.check(sequence)
            except OutsideWindow:
                self.subscribers_dropped += 1
                raise
            cursor = Cursor(sequence, None if tables is None else frozenset(tables))
            self._cursors.add(cursor)
            return cursor

    def unsubscribe(self, cursor: Cursor, dropped: bool = False) -> None:
        with self._cond:
            self._cursors.discard(cursor)
            self.subscribers_dropped += int(dropped)

    def _pending_time(self, sequence: int) -> float | None:
        """When the oldest change after `sequence` was recorded (None: nothing pending or not held)."""
        if sequence >= self.last or not self._entries:
            return None
        index = sequence + 1 - self._entries[0].sequence
        return self._entries[index].time if 0 <= index < len(self._entries) else None

    def stats(self) -> dict[str, float]:
        """Feed position and the state of its subscribers, for the metrics page."""
        now = self.clock()
        with self._cond:
            lags = [self._pending_time(c.sequence) for c in self._cursors]
            behind = [self.last - c.sequence for c in self._cursors]
            return {
                "subscribers": float(len(self._cursors)),
                "replication_lag_seconds": max((now - t for t in lags if t is not None), default=0.0),
                "replication_lag_sequences": float(max(behind, default=0)),
                "subscribers_dropped": float(self.subscribers_dropped),
                "changefeed_sequence": float(self.last),
                "changefeed_oldest_sequence": float(self.floor),
                "changefeed_rows": float(self._rows),
            }


class NullFeed:
    """The feed of a table outside a store (tests, tools): records nothing."""

    last = 0

    def record(self, table: str, ids: np.ndarray) -> int:
        return 0

    def imported(self, table: str, ranges: np.ndarray, replaced: bool) -> None:
        pass

    def table_dropped(self, table: str) -> int:
        return 0


NULL_FEED = NullFeed()
ChangeLog = ChangeFeed | NullFeed


def _islice(entries: deque[Entry], start: int) -> list[Entry]:
    """Entries from index `start` on (sequences are consecutive, so the index is arithmetic)."""
    return list(itertools.islice(entries, max(start, 0), None))
