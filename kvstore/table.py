"""A table: one cache tier over one RocksDB column family.

The cache holds rows in their stored byte layout; RocksDB is the source of
truth. `write_back` tables keep written rows dirty in the cache until eviction,
flush or close; `write_through` tables put every acknowledged write into
RocksDB before returning. Every public method holds the table's lock, so each
batch is atomic with respect to other batches of the same table.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .cache import SetAssociativeCache
from .changefeed import NULL_FEED, ChangeLog
from .config import TableConfig
from .errors import FailedPrecondition, InvalidArgument, RowNotFound
from .eviction.archive import archive_family
from .eviction.tracker import EvictionTracker, check_scores
from .initializer import initial_weights
from .optimizers import make_optimizer, sum_duplicates
from .rocks_tier import RocksTier
from .rows import RowLayout, encode_keys, encode_scores

ON_MISS = ("init_insert", "init", "zeros", "error")


@dataclass
class LookupResult:
    weights: np.ndarray              # [n, dim] in the table dtype, request order
    state: np.ndarray | None = None  # [n, state_dim] float32 when asked for


TAKE_ROWS_BYTES = 4 << 20    # lookups of up to this many row bytes gather whole rows first


class Table:
    def __init__(self, config: TableConfig, rocks: RocksTier, clock: Callable[[], float] = time.time):
        self.config = config
        self.name = config.name
        self.layout = RowLayout.of(config)
        self.rocks = rocks
        self.clock = clock
        self.cache = self._make_cache()
        self.write_through = config.cache.write == "write_through"
        self.optimizer = make_optimizer(config.optimizer, config.dim)
        self.counters: Counter[str] = Counter()
        self._leases: dict[str, np.ndarray] = {}   # owner -> ids it holds prefetch locks on
        self._lock = threading.RLock()
        self.changes: ChangeLog = NULL_FEED     # the store's change feed: every applied write is recorded
        self.eviction = EvictionTracker(config.eviction, self.layout, self.cache.capacity)
        if self.eviction.counts_rows:
            self.eviction.rows = rocks.count_keys(self.name)
        if config.eviction.archive_seconds:
            rocks.create_family(archive_family(self.name))

    def _make_cache(self) -> SetAssociativeCache:
        return SetAssociativeCache(self.config.cache, self.layout.row_bytes)

    # --- validation ----------------------------------------------------------

    def _ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise InvalidArgument(f"ids: must be one-dimensional, got shape {ids.shape}")
        if ids.size and ids.dtype.kind not in "iu":
            raise InvalidArgument(f"ids: must be integers, got {ids.dtype}")
        if ids.dtype == np.uint64 and ids.size and ids.max() > np.iinfo(np.int64).max:
            raise InvalidArgument("ids: values must fit in int64")
        return ids.astype(np.int64, copy=False)

    def _matrix(self, values, n: int, width: int, dtype: np.dtype, field: str) -> np.ndarray:
        values = np.asarray(values)
        if values.shape != (n, width):
            raise InvalidArgument(f"{field}: expected shape ({n}, {width}) for {n} ids, got {values.shape}")
        if values.dtype.kind not in "fiu" and values.dtype != dtype:
            raise InvalidArgument(f"{field}: must be floating point, got {values.dtype}")
        values = values.astype(dtype, copy=False)
        if not self.config.allow_nonfinite and not np.isfinite(values).all():
            raise InvalidArgument(f"{field}: contains NaN or Inf (table {self.name!r} does not allow them)")
        return values

    # --- reads -----------------------------------------------------------------

    def lookup(self, ids, on_miss: str = "init_insert", with_state: bool = False) -> LookupResult:
        """Rows in request order, duplicates included; misses follow `on_miss`."""
        if on_miss not in ON_MISS:
            raise InvalidArgument(f"on_miss: unknown mode {on_miss!r}; expected one of {list(ON_MISS)}")
        ids = self._ids(ids)
        with self._lock:
            self.cache.begin_batch()
            slots = self.cache.probe(ids)
            hit = slots >= 0
            all_hit = bool(hit.all())
            hit_slots = slots if all_hit else slots[hit]
            self.cache.touch(hit_slots)                  # protects them from this batch's evictions
            self.eviction.touch(self.cache.slab, hit_slots, self.clock())
            self.counters["cache_hits"] += len(hit_slots)
            if all_hit:                                  # every id cached: gather straight from the slab
                return self._result(self.cache.slab, slots, with_state)
            hit_at, miss_at = np.flatnonzero(hit), np.flatnonzero(~hit)
            self.counters["cache_misses"] += len(miss_at)
            miss_ids, inverse = np.unique(ids[miss_at], return_inverse=True)
            miss_rows = self._load(miss_ids, on_miss)   # hits were touched: no eviction moves them
            weights = np.empty((len(ids), self.config.dim), dtype=self.layout.dtype)
            weights[hit_at] = self.layout.weights(self.cache.slab)[slots[hit_at]]
            weights[miss_at] = self.layout.weights(miss_rows)[inverse]
            state = None
            if with_state:
                state = np.empty((len(ids), self.config.state_dim), dtype=np.float32)
                state[hit_at] = self.layout.state(self.cache.slab)[slots[hit_at]]
                state[miss_at] = self.layout.state(miss_rows)[inverse]
            return LookupResult(weights, state)

    def _result(self, rows: np.ndarray, slots, with_state: bool) -> LookupResult:
        """Weights (and state) of the given slab slots, as new contiguous arrays. Small batches
        take whole rows first (one `take` of fixed-size records beats indexing a strided view
        by about a quarter while the rows fit in the CPU cache), then copy the columns out."""
        if len(slots) * self.layout.row_bytes <= TAKE_ROWS_BYTES:
            rows = rows.view(f"V{self.layout.row_bytes}").reshape(-1).take(slots)
            rows = rows.view(np.uint8).reshape(len(slots), self.layout.row_bytes)
            slots = slice(None)
        weights = np.ascontiguousarray(self.layout.weights(rows)[slots])
        state = np.ascontiguousarray(self.layout.state(rows)[slots]) if with_state else None
        return LookupResult(weights, state)

    def _load(self, ids: np.ndarray, on_miss: str) -> np.ndarray:
        """Rows of unique uncached ids from RocksDB or the initializer; caches what is stored."""
        rows, present = self._fetch(ids, initialize=on_miss != "zeros")
        absent = ~present
        if on_miss == "error" and absent.any():
            missing = ids[absent]
            raise RowNotFound(f"ids: {len(missing)} ids not found in table {self.name!r} (first: {missing[0]})")
        new = absent.copy() if on_miss == "init_insert" else np.zeros_like(absent)
        if new.any():                                # admission: unseen ids are stored after min_count sightings
            admitted = self.eviction.admission.admit(ids[new])
            self.counters["admission_rejected"] += int((~admitted).sum())
            new[new] = admitted
            self.eviction.created(int(new.sum()))
        stored = present | new
        slots = self._admit(ids[stored], rows[stored], new[stored])
        self.eviction.touch(self.cache.slab, slots[slots >= 0], self.clock())
        homeless = np.flatnonzero(stored)[(slots < 0) & present[stored]]   # stored rows no set had room for
        if len(homeless):
            touched = rows[homeless]
            moved = self.eviction.touch_uncached(touched, self.clock())
            self._write_back(ids[homeless[moved]], touched[moved])
        return rows

    def _fetch(self, ids: np.ndarray, initialize: bool) -> tuple[np.ndarray, np.ndarray]:
        """Stored rows of unique uncached ids, and a mask of those present. Absent ids get
        the initializer's row (or zeros); nothing is cached or stored here."""
        values = self.rocks.get(self.name, encode_keys(ids))
        present = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
        rows = self.layout.empty(len(ids))
        if present.any():
            rows[present] = self.layout.from_values([v for v in values if v is not None])
        self.counters["rows_read"] += int(present.sum())
        absent = ~present
        if initialize and absent.any():
            fresh = initial_weights(self.config.initializer, ids[absent], self.config.dim)
            sub = rows[absent]
            self.layout.weights(sub)[:] = fresh.astype(self.layout.dtype)
            self.layout.header(sub)["last_access"] = int(self.clock())
            rows[absent] = sub
            self.counters["rows_initialized"] += int(absent.sum())
        return rows, present

    def _admit(self, ids: np.ndarray, rows: np.ndarray, new: np.ndarray) -> np.ndarray:
        """Put rows into the cache; returns the slot of each (-1: not cached). New rows must
        reach RocksDB: now (write-through, or no free way in their set) or when their dirty
        slot is written back. Clean victims with stale access metadata are written back too."""
        choice = self.cache.choose_slots(ids)
        cached = choice.slots >= 0
        persist_now = new & (~cached | self.write_through)
        stale_ids, stale_rows = self._stale_rows(choice.slots[cached])
        self._write_back(choice.dirty_ids, choice.dirty_rows, stale_ids, stale_rows,
                         ids[persist_now], rows[persist_now])
        self.cache.fill(choice.slots, ids, rows, new & (not self.write_through))
        self.eviction.synced(self.cache.slab, choice.slots[cached])
        return choice.slots

    def _stale_rows(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ids and rows of the clean occupied `slots` whose access metadata RocksDB lacks."""
        slots = slots[self.cache.occupied[slots] & ~self.cache.dirty[slots]]
        slots = slots[self.eviction.stale(self.cache.slab, slots)]
        return self.cache.keys[slots], self.cache.slab[slots]

    def _write_back(self, *id_row_pairs) -> None:
        ids = np.concatenate(id_row_pairs[0::2])
        rows = np.concatenate(id_row_pairs[1::2])
        if len(ids):
            self.rocks.write(self.name, encode_keys(ids), self.layout.to_values(rows))
            self.counters["rows_written"] += len(ids)

    # --- writes ----------------------------------------------------------------

    def _current_rows(self, ids: np.ndarray, initialize: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[n, row_bytes] current rows of unique ids (cache, else RocksDB, else new), their
        slots, and which ids have no row yet."""
        slots = self.cache.probe(ids)
        hit = slots >= 0
        self.cache.touch(slots[hit])
        rows = np.empty((len(ids), self.layout.row_bytes), dtype=np.uint8)
        rows[hit] = self.cache.slab[slots[hit]]
        new = np.zeros(len(ids), dtype=bool)
        if (~hit).any():
            rows[~hit], present = self._fetch(ids[~hit], initialize)
            new[~hit] = ~present
        return rows, slots, new

    def _store_rows(self, ids: np.ndarray, rows: np.ndarray, slots: np.ndarray) -> None:
        """Make `rows` the value of unique `ids` in every tier, as the write policy says."""
        header = self.layout.header(rows)
        header["last_access"] = int(self.clock())
        header["count"] += 1
        hit = slots >= 0
        if self.write_through:
            self._write_back(ids, rows)        # in RocksDB (and its WAL) before the cache changes
        self.cache.slab[slots[hit]] = rows[hit]
        self.cache.dirty[slots[hit]] |= not self.write_through
        if self.write_through:
            self.eviction.synced(self.cache.slab, slots[hit])
        self._admit(ids[~hit], rows[~hit], np.full(int((~hit).sum()), not self.write_through))

    def update(self, ids, weights, state=None, scores=None) -> int:
        """Overwrite weights (and optimizer state, and feature scores, when given); last write
        wins within the batch. An explicit write always stores the row (admission does not apply)."""
        ids = self._ids(ids)
        weights = self._matrix(weights, len(ids), self.config.dim, self.layout.dtype, "weights")
        if state is not None:
            state = self._matrix(state, len(ids), self.config.state_dim, np.dtype(np.float32), "state")
        scores = check_scores(scores, len(ids))
        last = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]
        ids, weights = ids[last], weights[last]
        state = state[last] if state is not None else None
        scores = scores[last] if scores is not None else None
        with self._lock:
            self.cache.begin_batch()
            rows, slots, new = self._current_rows(ids, initialize=False)
            self.layout.weights(rows)[:] = weights
            if state is not None:
                self.layout.state(rows)[:] = state
            if scores is not None:
                self.layout.header(rows)["score"] = encode_scores(scores)
            self._store_rows(ids, rows, slots)
            self.changes.record(self.name, ids)
            self.eviction.created(int(new.sum()))
            self.counters["rows_updated"] += len(ids)
        return len(ids)

    def apply_gradients(self, ids, grads, owner: str | None = None, scores=None) -> int:
        """Sum duplicate ids' gradients, then one optimizer step per unique row, atomically
        per batch. Missing rows are initialized first (as `init_insert`), unless admission
        has not admitted them yet: their gradients are dropped. `scores` (one per id; the
        highest wins for duplicates) become the rows' feature scores. Releases the prefetch
        locks `owner` holds on these ids. Returns the number of unique rows."""
        ids = self._ids(ids)
        grads = self._matrix(grads, len(ids), self.config.dim, np.dtype(np.float32), "grads")
        scores = check_scores(scores, len(ids))
        if scores is not None:
            unique, inverse = np.unique(ids, return_inverse=True)
            best = np.full(len(unique), -np.inf, dtype=np.float32)
            np.maximum.at(best, inverse, scores)
        ids, grads = sum_duplicates(ids, grads)
        if scores is not None:
            scores = best[np.searchsorted(unique, ids)]
        with self._lock:
            self.cache.begin_batch()
            rows, slots, new = self._current_rows(ids, initialize=True)
            if new.any() and self.eviction.admission.sketch is not None:
                keep = ~new
                keep[new] = self.eviction.admission.admitted(ids[new])
                self.counters["admission_rejected"] += int((~keep).sum())
                ids, grads, rows, slots, new = ids[keep], grads[keep], rows[keep], slots[keep], new[keep]
                scores = scores[keep] if scores is not None else None
            if scores is not None:
                self.layout.header(rows)["score"] = encode_scores(scores)
            weights = self.layout.weights(rows).astype(np.float32)
            state = self.layout.state(rows)
            header = self.layout.header(rows)
            header["step"] += 1
            self.optimizer.step(weights, state, grads, header["step"])
            self.layout.weights(rows)[:] = weights.astype(self.layout.dtype)
            self._store_rows(ids, rows, slots)
            self.changes.record(self.name, ids)
            self.eviction.created(int(new.sum()))
            if owner is not None:
                self._release(ids, owner)
            self.counters["rows_stepped"] += len(ids)
        return len(ids)

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
                self.cache.locks[slots[fresh]] += 1
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
        slots = slots[slots >= 0]
        self.cache.locks[slots] = self.cache.xp.maximum(self.cache.locks[slots] - 1, 0)
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
            if self.eviction.counts_rows:
                self.eviction.removed(int(self._existing(ids).sum()))
            self.rocks.write(self.name, [], delete=encode_keys(ids))
            self.cache.invalidate(ids)
            self.changes.record(self.name, ids)
            self.counters["rows_deleted"] += len(ids)
        return len(ids)

    def _existing(self, ids: np.ndarray) -> np.ndarray:
        """Which unique ids have a row (cached or stored). Call under the lock."""
        exists = self.cache.probe(ids) >= 0
        if (~exists).any():
            values = self.rocks.get(self.name, encode_keys(ids[~exists]))
            exists[~exists] = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
        return exists

    # --- maintenance -----------------------------------------------------------

    def flush(self) -> int:
        """Write every dirty cached row (and clean rows with stale access metadata) to RocksDB;
        returns dirty rows written."""
        with self._lock:
            slots = self.cache.dirty_slots()
            clean = np.flatnonzero(self.cache.occupied & ~self.cache.dirty)
            stale = clean[self.eviction.stale(self.cache.slab, clean)]
            both = np.concatenate([slots, stale])
            self._write_back(self.cache.keys[both], self.cache.slab[both])
            self.cache.dirty[slots] = False
            self.eviction.synced(self.cache.slab, both)
            return len(slots)

    def stats(self) -> dict[str, float]:
        with self._lock:
            counters = {k: float(v) for k, v in self.counters.items()}
            counters["cache_rows"] = float(self.cache.occupancy())
            counters["cache_capacity"] = float(self.cache.capacity)
            counters["cache_dirty_rows"] = float(len(self.cache.dirty_slots()))
            counters["cache_locked_rows"] = float((self.cache.locks > 0).sum())
            counters["estimated_rows"] = float(self.rocks.estimate_rows(self.name))
            if self.eviction.rows is not None:
                counters["rows"] = float(self.eviction.rows)    # exact, for tables with a row limit
            return counters


def open_table(config: TableConfig, rocks: RocksTier, clock: Callable[[], float] = time.time) -> Table:
    """A table whose cache tier is where `config.cache.device` says (host memory or a GPU)."""
    if config.cache.device == "cpu":
        return Table(config, rocks, clock)
    try:
        from .gpu_table import GpuTable
    except ImportError as exc:
        raise FailedPrecondition(f"cache.device: {config.cache.device!r} needs CuPy ({exc})") from None
    return GpuTable(config, rocks, clock)
