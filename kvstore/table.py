"""A table: its cache tiers over one RocksDB column family, and the only owner of them all.

The tiers (`tiers.py`) hold rows in their stored byte layout; RocksDB is the source of
truth. Every public method holds the table's lock, so each batch is atomic with
respect to other batches of the same table; snapshots, export/import, sweeps
and the store reach the table's state only through these methods.

Every batch is staged, written, then published: slots are chosen and rows
computed without changing anything, the RocksDB writes the call needs are made
(or queued to the store's writer), and only then does the cache change. A call
that fails therefore changes nothing, and retrying it never applies a step twice.

Write policies: `write_through` puts every acknowledged write (and the rows a
lookup creates) into RocksDB's WAL before returning. `write_back` keeps written
rows dirty in the cache; the store's flusher hands them to the writer at least
every `cache.flush_seconds`, eviction hands dirty victims over, close hands over
the rest. Rows handed over wait in `pending` until written, and reads look there
before RocksDB.

The methods that move rows in bulk (flushes, what snapshots and exports read, imports, sweeps,
archive, drop) live in `table_upkeep.TableUpkeep`, which `Table` mixes in.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import arrays
from .changefeed import NULL_FEED, ChangeLog
from .config import TableConfig
from .errors import FailedPrecondition, InvalidArgument, ResourceExhausted, RowNotFound, StorageError
from .eviction import archive
from .eviction.tracker import EvictionTracker, check_scores
from .initializer import write_initial
from .lower_tier import lower_tier_of
from .optimizers import sum_duplicates
from .rocks_tier import RocksTier
from .rows import RowLayout, encode_keys, encode_scores, row_records
from .table_upkeep import TableUpkeep
from .tiers import make_tier
from .validation import check_ids, check_matrix, sorted_distinct
from .writer import PendingRows, WriteJob, Writer, fault_error

ON_MISS = ("init_insert", "init", "zeros", "error")


@dataclass
class LookupResult:
    weights: np.ndarray              # [n, dim] in the table dtype, request order
    state: np.ndarray | None = None  # [n, state_dim] float32 when asked for


WRITE_SLICE = 512            # rows per RocksDB write batch of the writer (it holds the GIL meanwhile)
_NO_IDS = np.zeros(0, np.int64)


class Table(TableUpkeep):
    def __init__(self, config: TableConfig, rocks: RocksTier, writer: Writer,
                 clock: Callable[[], float] = time.time, family: str | None = None):
        self.config = config
        self.name = config.name
        self.family = family or config.name       # this incarnation's column family
        self.archive_family = archive.archive_family(self.family)
        self.layout = RowLayout.of(config)
        self.rocks = rocks
        self.writer = writer
        self.clock = clock
        self.cache = self._make_tier()
        self.lower = lower_tier_of(config, self.layout)      # a host tier under a GPU tier, or none
        self.has_lower_tier = bool(config.cache.host_rows)
        self.write_through = config.cache.write == "write_through"
        self.flush_seconds = None if self.write_through else config.cache.flush_seconds
        self.last_flush = time.monotonic()        # when the last completed flush started
        self.pending = PendingRows()
        self.counters: Counter[str] = Counter()
        self._leases: dict[str, np.ndarray] = {}   # owner -> ids it holds prefetch locks on
        self._last_step_cached = True             # the last step found every row cached (see _step_cached)
        self._lock = threading.RLock()
        self._flush_lock = threading.Lock()       # one flush at a time
        self._dropped = False
        self.changes: ChangeLog = NULL_FEED     # the store's change feed: every applied write is recorded
        self.eviction = EvictionTracker(config.eviction, self.layout, self.cache.capacity)
        if self.eviction.counts_rows:          # kept as rows come and go; saved at every flush
            saved = rocks.load_row_count(self.family)
            self.eviction.rows = rocks.count_keys(self.family) if saved is None else saved
        self._saved_rows = self.eviction.rows
        if config.eviction.archive_seconds:
            rocks.create_family(self.archive_family)
        rocks.labels.update({self.family: self.name, self.archive_family: archive.archive_family(self.name)})

    def _make_tier(self):
        """The cache tier the config names (`tiers.make_tier`). A host tier's memory grows with use
        up to its size; a size this machine could never hold is refused up front, naming the bytes."""
        if self.config.cache.device == "cpu":
            need = cache_bytes(self.config.cache.rows, self.layout.row_bytes)
            total = _physical_memory()
            if total and need > total:
                raise ResourceExhausted(f"cache.rows: {self.config.cache.rows} slots of {self.layout.row_bytes}-byte "
                                        f"rows need {need} bytes; this machine has {total}")
        try:
            return make_tier(self.config, self.layout)
        except MemoryError:
            raise ResourceExhausted(f"cache.rows: cannot allocate {self.config.cache.rows} cache slots of "
                                    f"{self.layout.row_bytes}-byte rows") from None

    # --- validation ----------------------------------------------------------

    def _ids(self, ids) -> np.ndarray:
        return check_ids(arrays.host(ids))

    def _matrix(self, values, n: int, width: int, dtype: np.dtype, field: str, finite: bool = True) -> np.ndarray:
        """`values` checked as check_matrix does; `finite=False` leaves the NaN/Inf check to the caller
        (apply_gradients checks the summed gradients: fewer rows, the same verdict)."""
        allow = self.config.allow_nonfinite or not finite
        return check_matrix(arrays.host(values), n, width, dtype, field, allow, self.name)

    def check_ids(self, ids) -> np.ndarray:
        """`ids` as int64, or InvalidArgument (for callers that stage rows, such as an import)."""
        return self._ids(ids)

    def check_rows(self, ids, weights, state=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Ids, weights and state of a batch, checked against the table's shape and dtype."""
        ids = self._ids(ids)
        weights = self._matrix(weights, len(ids), self.config.dim, self.layout.dtype, "weights")
        if state is not None:
            state = self._matrix(state, len(ids), self.config.state_dim, np.dtype(np.float32), "state")
        return ids, weights, state

    # --- reads -----------------------------------------------------------------

    def lookup(self, ids, on_miss: str = "init_insert", with_state: bool = False,
               out: np.ndarray | None = None) -> LookupResult:
        """Rows in request order, duplicates included; misses follow `on_miss`. Results are the
        kind of array `ids` is (NumPy, torch on the ids' device, or CuPy). `out`: a NumPy array
        the weights are written into, as `lookup_if_cached` takes it (one that does not fit the
        table is not used: the weights then come in new memory)."""
        if on_miss not in ON_MISS:
            raise InvalidArgument(f"on_miss: unknown mode {on_miss!r}; expected one of {list(ON_MISS)}")
        numpy_ids = self._ids(ids)
        if out is not None and not (isinstance(out, np.ndarray) and self._fits(out, len(numpy_ids))):
            out = None
        result = self._lookup(numpy_ids, on_miss, with_state, out)
        if isinstance(ids, np.ndarray):
            return result
        return LookupResult(arrays.like(result.weights, ids), arrays.like(result.state, ids))

    def _lookup(self, ids: np.ndarray, on_miss: str, with_state: bool, out: np.ndarray | None = None
                ) -> LookupResult:
        with self._lock:
            self.cache.begin_batch()
            # hits are stamped (safe from this batch's evictions) and their rows gathered; misses next
            slots, weights, state = self.cache.probe_touch_columns(ids, self.clock(), with_state, out)
            hit = slots >= 0
            hits = int(np.count_nonzero(hit))
            self.counters["cache_hits"] += hits
            if hits == len(ids):
                return LookupResult(weights, state)
            miss_at = np.flatnonzero(~hit)
            self.counters["cache_misses"] += len(miss_at)
            miss_ids = ids[miss_at]
            inverse = slice(None)                   # de-duplicated ids: each miss is its own row
            if not sorted_distinct(miss_ids):
                miss_ids, inverse = np.unique(miss_ids, return_inverse=True)
            miss_rows = self._load(miss_ids, on_miss)
            weights[miss_at] = self.layout.weights(miss_rows)[inverse]
            if with_state:
                state[miss_at] = self.layout.state(miss_rows)[inverse]
            return LookupResult(weights, state)

    def lookup_if_cached(self, ids, with_state: bool = False, out: np.ndarray | None = None, wait: bool = False
                         ) -> LookupResult | None:
        """`lookup(ids)` when the table lock is free right now and every id is cached, else None
        with nothing changed. Never waits for a lock and never reads RocksDB: its cost is a probe
        and a gather of len(ids) cached rows (`cached_columns`; a GPU tier also answers None
        while its device is busy), so a server may run it where it must not block. `wait`: wait
        for the lock instead (a store thread, which may block, writing rows to `out`). `out`: where
        the weights go, [len(ids), dim] of the table's dtype (else None: the table is not the
        one the caller sized it for, e.g. dropped and created again). A GPU table also takes a CuPy
        `out` (bfloat16 as uint16 bits): its rows are gathered there on the device."""
        ids = self._ids(ids)
        if out is not None and not self._fits(out, len(ids)):
            return None
        if not self._lock.acquire(blocking=wait):
            return None
        try:
            columns = self.cache.cached_columns(ids, self.clock(), with_state, out)
            if columns is None:
                return None
            self.counters["cache_hits"] += len(ids)
            return LookupResult(*columns)
        finally:
            self._lock.release()

    def _fits(self, out, n: int) -> bool:
        """Whether lookup_if_cached can put `n` rows' weights into `out`."""
        if out.shape != (n, self.config.dim) or not out.flags.c_contiguous:
            return False
        if isinstance(out, np.ndarray):
            return out.dtype == self.layout.dtype
        device_dtype = np.dtype(np.uint16) if self.layout.dtype == arrays.BF16 else self.layout.dtype
        return self.cache.gathers_to_device and out.dtype == device_dtype

    def _load(self, ids: np.ndarray, on_miss: str) -> np.ndarray:
        """Rows of unique uncached ids from RocksDB or the initializer; caches what is stored."""
        rows, present, held_dirty = self._fetch(ids, initialize=on_miss not in ("zeros", "error"))
        absent = ~present
        if on_miss == "error" and absent.any():
            missing = ids[absent]
            raise RowNotFound(f"ids: {len(missing)} ids not found in table {self.name!r} (first: {missing[0]})")
        if on_miss != "zeros":
            self.counters["rows_initialized"] += int(absent.sum())
        storing = on_miss == "init_insert" and self.writer.fault is None   # in a storage fault: as `init`
        new = absent.copy() if storing else np.zeros_like(absent)
        if new.any():                                # admission: unseen ids are stored after min_count sightings
            admitted = self.eviction.admission.admit(ids[new])
            self.counters["admission_rejected"] += int((~admitted).sum())
            new[new] = admitted
        stored = present | new
        every = bool(stored.all())                   # the usual case: no copies of the rows to place
        slots = (self._place(ids, rows, new | held_dirty) if every else
                 self._place(ids[stored], rows[stored], (new | held_dirty)[stored]))
        self.eviction.created(int(new.sum()))
        self.cache.access(slots[slots >= 0], self.clock())
        if not self.eviction.persist_touches:        # an uncached row's access reaches RocksDB only for sweeps
            return rows
        homeless = np.flatnonzero(stored)[(slots < 0) & present[stored]]   # stored rows no set had room for
        if len(homeless) and self.writer.fault is None:
            touched = rows[homeless]
            moved = self.eviction.touch_uncached(touched, self.clock())
            self._write_behind(ids[homeless[moved]], touched[moved], "access metadata")
        return rows

    def _fetch(self, ids: np.ndarray, initialize: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of unique ids the top tier lacks, a mask of those present, and of those dirty in
        the tier below. Absent ids get the initializer's row (or zeros); nothing moves here."""
        rows, present, held_dirty = self._rows_below(ids)
        self.counters["rows_read"] += int(present.sum())
        absent = ~present
        if initialize and absent.any():
            every = bool(absent.all())                   # all new (a fresh table's usual case): no copies
            sub = rows if every else rows[absent]
            write_initial(self.config.initializer, ids if every else ids[absent], self.layout.weights(sub))
            self.layout.header(sub)["last_access"] = int(self.clock())
            if not every:
                rows[absent] = sub
        return rows, present, held_dirty

    def _stored_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, present) of unique ids the top tier lacks, as `_rows_below` finds them."""
        return self._rows_below(ids)[:2]

    def _rows_below(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of unique ids the top tier lacks: from the tier below, else as the writer will
        leave them (pending ones, else RocksDB's); with masks of those present and of those dirty
        in the tier below. (Rows change only under the table lock: none can appear meanwhile.)"""
        rows = self.layout.empty(len(ids))
        present, held_dirty = self.lower.read(ids, rows)
        rest = np.flatnonzero(~present)
        if self.has_lower_tier:
            self.counters["host_tier_reads"] += len(ids) - len(rest)
        if len(rest) and self.pending:
            sub = rows[rest]
            found = self.pending.find(ids[rest], sub)
            rows[rest[found]] = sub[found]
            present[rest[found]] = True
            rest = rest[~found]
        if len(rest):                  # RocksDB writes straight into `rows` when every id is read from it
            target = rows if len(rest) == len(ids) else rows[rest]
            found = self.rocks.read_rows(self.family, encode_keys(ids[rest]), target)
            if target is not rows:
                rows[rest[found]] = target[found]
            present[rest] = found
        return rows, present, held_dirty

    def _place(self, ids: np.ndarray, rows: np.ndarray, changed: np.ndarray,
               direct_ids: np.ndarray = _NO_IDS, direct_rows: np.ndarray | None = None) -> np.ndarray:
        """Cache rows of unique uncached ids; returns the slot of each (-1: not cached).
        `changed` rows differ from RocksDB. Stage (choose slots: nothing changes), write
        (write-through: `direct_*` and changed rows now; dirty victims, stale clean victims and
        write-back rows with no slot to the writer), then publish (fill the slots). Displaced
        rows move down a tier where the table has one; what leaves the last tier dirty is written.
        The tier below forgets `ids`: they are now above, or written, or unchanged in RocksDB."""
        slots, victim_ids, victim_rows = self._choose(ids)
        cached = slots >= 0
        stale_ids, stale_rows = self._stale_rows(slots[cached])
        if direct_rows is None:
            direct_rows = self.layout.empty(0)
        if self.write_through:
            changed_rows = rows if changed.all() else rows[changed]
            self._write_now(_join([direct_ids, ids[changed], stale_ids]),
                            _join([direct_rows, changed_rows, stale_rows]))
            self._write_behind(victim_ids, victim_rows, "dirty victims")
        else:
            homeless = changed & ~cached
            if self.writer.fault is not None:   # only lookups get here in a fault: no optional writes
                stale_ids, stale_rows = _NO_IDS, self.layout.empty(0)
            self._write_behind(np.concatenate([victim_ids, stale_ids, ids[homeless]]),
                               np.concatenate([victim_rows, stale_rows, rows[homeless]]), "dirty victims")
        self.cache.fill(slots, ids, rows, changed & (not self.write_through))
        self.eviction.synced(self.cache, slots[cached])
        self.lower.forget(ids)
        return slots

    def _choose(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slots for new ids and the dirty rows they displace. In a storage fault no dirty
        row is displaced (it could not be written): those ids stay uncached."""
        choice = self.cache.choose_slots(ids, clean=self.has_lower_tier)
        slots = choice.slots
        if self.writer.fault is not None and len(choice.dirty_ids):
            taken = np.flatnonzero(slots >= 0)
            occupied, dirty = self.cache.flags(slots[taken])
            busy = occupied & dirty
            slots = slots.copy()
            slots[taken[busy]] = -1
            return slots, _NO_IDS, self.layout.empty(0)
        if not self.has_lower_tier:
            return slots, choice.dirty_ids, choice.dirty_rows
        moving = np.concatenate([choice.dirty_ids, choice.clean_ids])
        dirty = np.arange(len(moving)) < len(choice.dirty_ids)
        victim_ids, victim_rows = self.lower.take_victims(moving, np.concatenate([choice.dirty_rows,
                                                                                  choice.clean_rows]), dirty)
        return slots, victim_ids, victim_rows

    def _stale_rows(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ids and rows of the clean occupied `slots` whose access metadata RocksDB lacks."""
        if not self.eviction.persist_touches or not len(slots):
            return _NO_IDS, self.layout.empty(0)
        occupied, dirty = self.cache.flags(slots)
        slots = slots[occupied & ~dirty]
        slots = slots[self.eviction.stale(self.cache, slots)]
        return self.cache.keys_of(slots), self.cache.rows(slots)

    # --- RocksDB writes ------------------------------------------------------------

    def _write_now(self, ids: np.ndarray, rows: np.ndarray, deletes: np.ndarray = _NO_IDS) -> None:
        """The reply write of a call: into RocksDB (and its WAL) before the call returns. Rows of
        these ids still waiting for the writer go first, so an older value never lands last."""
        if not len(ids) and not len(deletes):
            return
        if self.pending:
            self.pending.wait_for(np.concatenate([ids, deletes]))
        try:
            self.rocks.write(self.family, _keys_by_slice(ids), _values_by_slice(self.layout, rows),
                             encode_keys(deletes))
        except StorageError as exc:
            self.writer.report(self.rocks, exc)
            raise fault_error(str(exc)) from None
        self.counters["rows_written"] += len(ids)

    def _write_back(self, *id_row_pairs) -> None:
        """Write (id, row) pairs now (the GPU tier's path for victims and write-through rows)."""
        self._write_now(np.concatenate(id_row_pairs[0::2]), np.concatenate(id_row_pairs[1::2]))

    def _write_behind(self, ids: np.ndarray, rows: np.ndarray, what: str) -> WriteJob | None:
        """Hand rows to the store's writer (waits while its queue is full); until written they
        are served from `pending`. Call under the table lock, so queue order is change order."""
        if not len(ids) or self._dropped:
            return None
        rows = np.ascontiguousarray(rows)
        entry = self.pending.add(ids, rows)
        sorted_ids, order, _ = entry
        rocks, family, pending = self.rocks, self.family, self.pending

        def perform() -> None:
            # rocksdict holds the GIL through a write batch: short batches, and a yield after
            # each, keep request threads of every table running while the writer works. Key
            # order: each memtable insert starts from where the last one went (RocksDB's skip
            # list keeps that splice), about a third less time per row than random keys.
            # The keys are made once per job and each slice's values with one gather of whole
            # row records: NumPy's cost per call, not per row, is what a 512-row slice pays
            keys, records = encode_keys(sorted_ids), row_records(rows)
            for at in range(0, len(ids), WRITE_SLICE):
                rocks.write(family, keys[at:at + WRITE_SLICE], records.take(order[at:at + WRITE_SLICE]).tolist())
                time.sleep(0)
        job = WriteJob(rocks, perform, f"{what} of table {self.name!r} ({len(ids)} rows)", len(ids),
                       on_done=lambda: pending.remove(entry))
        try:
            self.writer.submit(job)
        except BaseException:
            pending.remove(entry)
            raise
        self.counters["rows_written"] += len(ids)
        return job

    def _run_job(self, perform: Callable[[], None], what: str, rows: int = 0) -> None:
        """A maintenance write (sweep, archive, import) through the writer, waited for; queued
        after this table's pending rows, so it sees them written."""
        self.writer.run(WriteJob(self.rocks, perform, f"{what} of table {self.name!r}", rows))

    # --- writes ----------------------------------------------------------------

    def _current_rows(self, ids: np.ndarray, initialize: bool):
        """Staged current rows of unique ids (cache, else RocksDB, else new; in the tier's
        memory), their slots, and which ids have no row yet."""
        slots = self.cache.probe(ids)
        hit = slots >= 0
        all_hit = bool(hit.all())
        self.cache.touch(slots if all_hit else slots[hit])
        new = np.zeros(len(ids), dtype=bool)
        if not hit.any():                          # nothing cached: the fetched rows are the staged ones
            fetched, present, _ = self._fetch(ids, initialize)
            return self.cache.from_host(fetched), slots, ~present
        rows = self.cache.stage(slots)
        if not all_hit:
            miss = np.flatnonzero(~hit)
            fetched, present, _ = self._fetch(ids[miss], initialize)
            self.cache.load(rows, miss, fetched)
            new[miss] = ~present
        return rows, slots, new

    def _store_rows(self, ids: np.ndarray, rows, slots: np.ndarray) -> None:
        """Make staged `rows` the value of unique `ids` in every tier, as the write policy says:
        the RocksDB writes first (in `_place`), then the cache."""
        self.cache.touch_staged(rows, self.clock())
        hit = slots >= 0
        all_hit = bool(hit.all())
        at = slice(None) if all_hit else np.flatnonzero(hit)
        miss = np.flatnonzero(~hit)
        direct = self.cache.to_host(self.cache.select(rows, at)) if self.write_through else None
        if len(miss) or direct is not None:
            missed = self.cache.to_host(rows if len(miss) == len(ids) else self.cache.select(rows, miss))
            self._place(ids[miss], missed, np.ones(len(miss), dtype=bool), ids[at], direct)
        cached_rows, cached_slots = (rows, slots) if all_hit else (self.cache.select(rows, at), slots[at])
        self.cache.publish(cached_slots, cached_rows)
        if self.write_through:
            self.eviction.synced(self.cache, cached_slots)
        else:
            self.cache.set_dirty(cached_slots, True)

    def update(self, ids, weights, state=None, scores=None) -> int:
        """Overwrite weights (and optimizer state, and feature scores, when given); last write
        wins within the batch. An explicit write always stores the row (admission does not apply)."""
        ids, weights, state = self.check_rows(ids, weights, state)
        scores = check_scores(arrays.host(scores), len(ids))
        last = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]
        if len(last) < len(ids):                   # duplicates: keep each id's last row (no copy otherwise)
            ids, weights = ids[last], weights[last]
            state = state[last] if state is not None else None
            scores = scores[last] if scores is not None else None
        with self._lock:
            self._check_writable()
            self.cache.begin_batch()
            rows, slots, new = self._current_rows(ids, initialize=False)
            self.cache.set_columns(rows, weights, state)
            if scores is not None:
                self.cache.set_scores(rows, encode_scores(scores))
            self._store_rows(ids, rows, slots)
            self.changes.record(self.name, ids)
            self.eviction.created(int(new.sum()))
            self.counters["rows_updated"] += len(ids)
        return len(ids)

    def _check_writable(self) -> None:
        self.writer.check()
        if self._dropped:
            raise FailedPrecondition(f"table: {self.name!r} was dropped")

    def apply_gradients(self, ids, grads, owner: str | None = None, scores=None) -> int:
        """Sum duplicate ids' gradients, then one optimizer step per unique row, atomically
        per batch. Missing rows are initialized first (as `init_insert`), unless admission
        has not admitted them yet: their gradients are dropped. `scores` (one per id; the
        highest wins for duplicates) become the rows' feature scores. Releases the prefetch
        locks `owner` holds on these ids. A step that would leave NaN or Inf in a table that
        does not allow them is refused. Returns the number of unique rows."""
        ids, grads, scores = self._summed_gradients(ids, grads, scores)
        with self._lock:
            self._check_writable()
            if scores is None and not self.write_through and self._last_step_cached \
                    and self._step_cached(ids, grads, owner):
                return len(ids)
            self.cache.begin_batch()
            rows, slots, new = self._current_rows(ids, initialize=True)
            self._last_step_cached = bool((slots >= 0).all())
            if new.any() and self.eviction.admission.sketch is not None:
                keep = ~new
                keep[new] = self.eviction.admission.admitted(ids[new])
                self.counters["admission_rejected"] += int((~keep).sum())
                keep = np.flatnonzero(keep)
                ids, grads, slots, new = ids[keep], grads[keep], slots[keep], new[keep]
                rows = self.cache.select(rows, keep)
                scores = scores[keep] if scores is not None else None
            if scores is not None:
                self.cache.set_scores(rows, encode_scores(scores))
            self._refuse_nonfinite(ids, self.cache.step(rows, grads))     # staged copies: refused, nothing changed
            self._store_rows(ids, rows, slots)
            self.counters["rows_initialized"] += int(new.sum())
            self.eviction.created(int(new.sum()))
            self._stepped(ids, owner)
        return len(ids)

    def apply_gradients_if_cached(self, ids, grads) -> int | None:
        """`apply_gradients(ids, grads)` when it needs no waiting: a host-memory cache holds every
        id, the table keeps its writes in memory until a flush (write_back) and its lock is free
        right now; else None with nothing changed. Bad input raises as `apply_gradients` does.
        So a server may run a small training step where it must not block (its event loop).
        A GPU table's steps go to the store threads: run here they cost the server no less CPU
        (docs/benchmarks.md: "GPU training steps on the event loop") and would hold the loop through the
        device's waits."""
        if self.write_through or self.config.cache.device != "cpu":
            return None
        ids, grads, _ = self._summed_gradients(ids, grads, None)
        if not self._lock.acquire(blocking=False):
            return None
        try:
            self._check_writable()
            if not self._step_cached(ids, grads, None):
                return None
        finally:
            self._lock.release()
        return len(ids)

    def _summed_gradients(self, ids, grads, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Checked ids and gradients with duplicates summed (unique ids, sorted), and each unique
        id's score (the highest of its duplicates') when scores are given."""
        ids = self._ids(ids)
        grads = self._matrix(grads, len(ids), self.config.dim, np.dtype(np.float32), "grads", finite=False)
        scores = check_scores(arrays.host(scores), len(ids))
        if scores is not None:
            unique, inverse = np.unique(ids, return_inverse=True)
            best = np.full(len(unique), -np.inf, dtype=np.float32)
            np.maximum.at(best, inverse, scores)
        ids, grads = sum_duplicates(ids, grads)     # NaN/Inf checked on the sums: fewer rows, same verdict
        self._matrix(grads, len(ids), self.config.dim, np.dtype(np.float32), "grads")
        if scores is not None:
            scores = best[np.searchsorted(unique, ids)]
        return ids, grads, scores

    def _step_cached(self, ids: np.ndarray, grads: np.ndarray, owner: str | None) -> bool:
        """The step of a write-back table whose cache holds every id, in the tier's one call
        (`step_cached`: on a GPU, one wait for the device instead of two). False, with nothing
        changed, when an id is not cached. Called with the lock held. `apply_gradients` tries it
        only when its last step found every row cached: a failed try costs a GPU table nearly a
        step's CPU (0.4 ms at 1,024 ids), so a stream of batches with new rows skips it."""
        bad = self.cache.step_cached(ids, grads, self.clock(), not self.config.allow_nonfinite)
        self._last_step_cached = bad is not None
        if bad is None:
            return False
        self._refuse_nonfinite(ids, bad)
        self._stepped(ids, owner)
        return True

    def _stepped(self, ids: np.ndarray, owner: str | None) -> None:
        """What follows every kept step: the change recorded, `owner`'s locks released, counted."""
        self.changes.record(self.name, ids)
        if owner is not None:
            self._release(ids, owner)
        self.counters["rows_stepped"] += len(ids)

    def _refuse_nonfinite(self, ids: np.ndarray, bad: np.ndarray) -> None:
        if not self.config.allow_nonfinite and bad.any():
            raise InvalidArgument(f"grads: the step would write NaN or Inf into {int(bad.sum())} rows of "
                                  f"table {self.name!r} (ids {ids[bad][:8].tolist()}); nothing was changed")

    # --- prefetch and locks ------------------------------------------------------

    def prefetch(self, ids, lock: bool = False, owner: str = "") -> int:
        """Load rows into the cache ahead of use (initializing missing ones, as `init_insert`).
        With `lock`, pin them until `owner` releases them or steps them with apply_gradients.
        Returns how many of the unique ids are cached (a set full of pinned rows can refuse some)."""
        ids = np.unique(self._ids(ids))
        with self._lock:
            self.cache.begin_batch()
            slots = self.cache.probe(ids)
            miss = slots < 0
            if miss.any():
                self._load(ids[miss], "init_insert")
                slots = self.cache.probe(ids)
            cached = slots >= 0
            self.cache.touch(slots[cached])
            if lock:                                     # an owner pins a row at most once
                held = self._leases.get(owner)
                fresh = cached if held is None else cached & ~np.isin(ids, held, assume_unique=True)
                self.cache.lock(slots[fresh])
                self._leases[owner] = ids[fresh] if held is None else np.union1d(held, ids[fresh])
            return int(cached.sum())

    def release(self, ids, owner: str = "") -> int:
        """Unpin rows `owner` locked with prefetch; returns how many were released."""
        with self._lock:
            return self._release(np.unique(self._ids(ids)), owner)

    def release_all(self, owner: str) -> int:
        """Unpin everything `owner` holds (its client went away)."""
        with self._lock:
            held = self._leases.get(owner)
            return 0 if held is None else self._release(held, owner)

    def _release(self, ids: np.ndarray, owner: str) -> int:
        held = self._leases.get(owner)
        if held is None:
            return 0
        mine = np.intersect1d(ids, held, assume_unique=True)
        slots = self.cache.probe(mine)
        self.cache.unlock(slots[slots >= 0])
        rest = np.setdiff1d(held, mine, assume_unique=True)
        if len(rest):
            self._leases[owner] = rest
        else:
            del self._leases[owner]
        return len(mine)

    def delete(self, ids) -> int:
        """Remove rows from every tier; absent ids are ignored. Returns unique ids processed."""
        ids = np.unique(self._ids(ids))
        with self._lock:
            self._check_writable()
            exists = self._existing(ids) if self.eviction.counts_rows else None
            self._write_now(_NO_IDS, self.layout.empty(0), deletes=ids)
            self.cache.invalidate(ids)
            self.lower.forget(ids)
            self.changes.record(self.name, ids)
            if exists is not None:
                self.eviction.removed(int(exists.sum()))
            self.counters["rows_deleted"] += len(ids)
        return len(ids)

    def _existing(self, ids: np.ndarray) -> np.ndarray:
        """Which unique ids have a row (cached or stored). Call under the lock."""
        exists = self.cache.probe(ids) >= 0
        if (~exists).any():
            exists[~exists] = self._stored_rows(ids[~exists])[1]
        return exists

    def _rows_now(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cache slots, exists) of unique ids as they stand now. Call under the lock."""
        slots = self.cache.probe(ids)
        cached = slots >= 0
        rows = self.layout.empty(len(ids))
        rows[cached] = self.cache.rows(slots[cached])
        exists = cached.copy()
        if (~cached).any():
            rows[~cached], exists[~cached] = self._stored_rows(ids[~cached])
        return rows, slots, exists


def _join(parts: list[np.ndarray]) -> np.ndarray:
    """np.concatenate, without a copy when only one part has rows."""
    full = [part for part in parts if len(part)]
    return full[0] if len(full) == 1 else np.concatenate(parts)


def _keys_by_slice(ids: np.ndarray, step: int = 8192):
    """RocksDB keys of `ids`, made a slice at a time (a large batch never holds them all as objects)."""
    for at in range(0, len(ids), step):
        yield from encode_keys(ids[at:at + step])


def _values_by_slice(layout: RowLayout, rows: np.ndarray, step: int = 8192):
    for at in range(0, len(rows), step):
        yield from layout.to_values(rows[at:at + step])


def cache_bytes(rows: int, row_bytes: int) -> int:
    """Host bytes of a cache of `rows` slots at most: the slab, then per slot the key, probe hint
    pair, fingerprint, stamps, lock count and flags."""
    return rows * (row_bytes + 8 + 16 + 2 + 8 + 8 + 4 + 2)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def open_table(config: TableConfig, rocks: RocksTier, writer: Writer, clock: Callable[[], float] = time.time,
               family: str | None = None) -> Table:
    """A table over the cache tier `config.cache.device` names (host memory or a GPU)."""
    return Table(config, rocks, writer, clock, family)
