"""The cache tier: a set-associative cache of rows in their stored layout.

S sets x W ways. Each slot holds one row (header, weights, optimizer state:
the exact bytes RocksDB stores), its key, an occupied bit, a dirty bit, a lock
count and the stamps the victim choice reads. The code is written against an
array module `xp` (NumPy here; the GPU tier runs the same design in HBM, with its
own kernels); a batch's hot paths are compiled loops over its rows (`host_kernels`)
or whole-array operations: no Python loop per row.

Victim choice is the only policy-specific part: `VictimOrder` says how the ways
of a set are ranked (LRU: oldest use first; LFU: fewest uses, then oldest). Slots that are
locked, or that the current batch already uses, are never victims, so a batch
with many misses to one set never gives one slot to two ids.

A row whose set is full while the next set has a free way goes there instead of
displacing a row (`_spill`; the GPU tier runs the same pass): with random sets a few
always get more rows than ways long before the cache is full (262,144 rows in 2^19
slots of 32 ways: about 18), and without a second place those rows would take turns
with their set's others forever. The home set remembers it spilled (`spilled`), so a
probe that misses there looks in the next set too; a victim is chosen only when both
are full.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import CacheConfig
from .host_kernels import (
    aligned_full,
    choose_ways,
    fill_slots,
    gather_rows,
    probe_slots,
    scatter_rows,
    spill_into,
)
from .initializer import GOLDEN
from .prefault import populate_in_background
from .row_threads import MAX_THREADS

MIX = np.uint64(0xD6E8FEB86659FD93)      # `mix`: id * GOLDEN, xorshift 32, * MIX, xorshift 32 (host_loops too)
_GOLDEN_INV = np.uint64(pow(int(GOLDEN), -1, 1 << 64))   # the mix's inverse multiplies by these
_MIX_INV = np.uint64(pow(int(MIX), -1, 1 << 64))
_SHIFT = np.uint64(32)
HINT_WAYS = 4                             # (key, slot) pairs in a hint bucket: 4 x 16 bytes, one cache line


class VictimOrder:
    """Which occupied way of a set leaves first. The keys are computed where the ways are
    ranked (`host_loops.choose_ways`; the GPU tier's `choose_victims` kernel): LRU, the
    oldest batch stamp; LFU, the fewest uses, then the oldest. `counts_uses`: the order reads a
    use count per slot (`cache.uses`, 8 bytes a slot, allocated only for such orders)."""

    counts_uses = False

    def on_hit(self, cache: SetAssociativeCache, slots) -> None:
        pass


class LRU(VictimOrder):
    pass


class LFU(VictimOrder):
    counts_uses = True

    def on_hit(self, cache, slots) -> None:
        cache.uses[slots] += 1


POLICIES = {"lru": LRU, "lfu": LFU}


@dataclass
class Eviction:
    """Slots chosen for a batch of new ids, and the dirty rows they displace."""

    slots: np.ndarray          # [n] slot per new id, -1 where its set had no free way
    dirty_ids: np.ndarray      # ids of displaced dirty rows: write them back before `fill`
    dirty_rows: np.ndarray     # [k, row_bytes] their rows
    clean_ids: np.ndarray | None = None    # with `clean=True`: ids of displaced clean rows
    clean_rows: np.ndarray | None = None   # and their rows (they may move down a tier)


class SetAssociativeCache:
    spills = True      # full sets spill into the next (`_spill`); False: the design without (a test reference)
    paging_in = None   # the thread paging in a large host slab (`_new_slab`), while it runs

    def __init__(self, config: CacheConfig, row_bytes: int, xp=np):
        self.xp = xp
        self.ways = config.ways
        self.num_sets = config.rows // config.ways
        self.capacity = config.rows
        self.row_bytes = row_bytes
        self.order = POLICIES[config.policy]()
        n = config.rows
        self.keys = xp.zeros(n, dtype=xp.int64)
        self._probe_index(n)
        self.occupied = xp.zeros(n, dtype=bool)
        self.dirty = xp.zeros(n, dtype=bool)
        self.locks = xp.zeros(n, dtype=xp.int32)
        self.last_used = xp.zeros(n, dtype=xp.int64)   # batch tick of the last use
        self.uses = xp.zeros(n, dtype=xp.int64) if self.order.counts_uses else None
        self.slab = self._new_slab(n, row_bytes)
        self.spilled = xp.zeros(self.num_sets, dtype=bool)   # a row of this set is in the next set
        self._held = 0                # occupied slots (the host tier's count; spills only while < capacity)
        self.tick = 0

    def _new_slab(self, n: int, row_bytes: int):
        """The rows' memory: [n, row_bytes] bytes, zeroed; a large one paged in by a thread of
        its own from now on, so that no request pays its first-write faults (`prefault`)."""
        slab = self.xp.zeros((n, row_bytes), dtype=self.xp.uint8)
        self.paging_in = populate_in_background(slab, "cache slab") if self.xp is np else None
        return slab

    def _probe_index(self, n: int) -> None:
        """What the host probe reads before whole sets: `hints`, (key, slot) pairs in buckets of
        HINT_WAYS (one 64-byte cache line) indexed by low bits of the key's mix. A pair is exact
        (slot holds key) or its slot is -1: `fill`, `invalidate` and `clear` retire the pairs of
        the slots they change. 16 bytes per slot, as one pair per bucket would take; but where one
        pair a bucket found 79% of the rows of a cache at load 0.5 (the rest probed by set, a
        cache miss or three each), four found 96%, and the probe of 4,096 ids took half the time
        (docs/benchmarks.md). Then `fingerprints`: 16 hash bits of each slot's key, for the set probe."""
        pairs = max(1 << (n - 1).bit_length(), HINT_WAYS * MAX_THREADS)   # buckets >= threads: parts own theirs
        self.hint_mask = np.uint64(pairs // HINT_WAYS - 1)
        self.hints = aligned_full((pairs // HINT_WAYS, HINT_WAYS, 2), -1, np.int64)      # a bucket a cache line
        self.fingerprints = self.xp.zeros(n, dtype=self.xp.uint16)

    def _unhint(self, ids, slots) -> None:
        """Retire the pairs of ids leaving `slots` (other ids' pairs at the same index stay)."""
        if self.hints is not None and len(ids):
            at = (self.mix(ids) & self.hint_mask).astype(np.int64)
            which, way = np.nonzero(self.hints[at, :, 1] == np.asarray(slots)[:, None])
            self.hints[at[which], way, 1] = -1

    # --- lookup ------------------------------------------------------------

    def begin_batch(self) -> None:
        """Start a batch: slots used from now on are protected from eviction until the next."""
        self.tick += 1

    def mix(self, ids):
        """Every bit of the id mixed in (two multiply-xorshift rounds): sequential or strided
        ids must spread over all sets, not crowd a few."""
        xp = self.xp
        mixed = ids.astype(xp.int64, copy=False).view(xp.uint64) * GOLDEN
        mixed ^= mixed >> _SHIFT
        mixed *= MIX
        mixed ^= mixed >> _SHIFT
        return mixed

    def unmix(self, mixed):
        """The ids of mixed values: the mix is a bijection (odd multipliers, xorshifts by 32)."""
        h = mixed.copy()
        h ^= h >> _SHIFT
        h *= _MIX_INV
        h ^= h >> _SHIFT
        h *= _GOLDEN_INV
        return h.view(self.xp.int64)

    def _set_from(self, mixed):
        """The set from the top 32 bits of the mix, scaled (multiply-shift, no division): sets
        grow with the mix, so ids sorted by their mix visit the slab in slot order."""
        return (((mixed >> _SHIFT) * np.uint64(self.num_sets)) >> _SHIFT).astype(self.xp.int64)

    def set_of(self, ids):
        return self._set_from(self.mix(ids))

    def probe(self, ids):
        """Slot of each id, -1 where it is not cached. Pure: changes no stamp.

        The id's (key, slot) hint finds most cached ids. The rest (a hint lost to another id,
        or a real miss) are probed by set: on 2-byte fingerprints, each match verified against
        the key. Ids found that way are hinted again.
        One loop that prefetches the hints ahead (`host_kernels.probe_slots`)."""
        return probe_slots(*self.probing(), ids)

    def probing(self) -> tuple:
        """What a host probe reads: `host_kernels.probe_slots`' arguments before the ids."""
        return self.hints, self.hint_mask, self.keys, self.occupied, self.fingerprints, self.ways, self.spilled

    def touch(self, slots) -> None:
        """Record a use of cached slots (duplicates allowed)."""
        self.last_used.put(slots, self.tick)
        self.order.on_hit(self, slots)

    # --- insert --------------------------------------------------------------

    def choose_slots(self, ids, clean: bool = False) -> Eviction:
        """Pick a slot for each new (unique, uncached) id. Changes nothing yet:
        the caller writes the dirty victims back, then calls `fill`. With `clean`, the
        displaced clean rows come too. Each set's new ids take its ways in the victim
        order (`choose_ways`, one compiled pass), then the spill."""
        n = len(ids)
        if n == 0:
            return Eviction(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, self.row_bytes), np.uint8))
        sets = self.set_of(ids)
        slots, displacing = choose_ways(self.occupied, self.last_used, self.locks, self.uses, self.tick,
                                        self.ways, sets)
        if self.spills and self._held < self.capacity and self.num_sets > 1:   # a full cache: no free way
            self._spill(sets, slots, np.flatnonzero(displacing), np.sort(slots[~displacing]))
        return self._eviction(slots, clean)

    def _spill(self, sets, slots, wanting, given) -> None:
        """The ids at `wanting` (they would displace a row, or found no way) take a free way of
        the next set where it has one: unoccupied, unlocked, not given to another id of this
        batch (`given`: the empty ways given, sorted); in batch order, after that set's own new
        ids. Changes `slots` in place (`host_kernels.spill_into`)."""
        if not len(wanting):
            return
        near = (sets[wanting] + 1) % self.num_sets
        shape = (self.num_sets, self.ways)
        chosen = spill_into(self.occupied.reshape(shape), self.locks.reshape(shape), near, near, self.ways, given)
        moved = chosen >= 0
        slots[wanting[moved]] = chosen[moved]

    def _eviction(self, slots, clean: bool) -> Eviction:
        taken = slots[slots >= 0]
        occupied = taken[self.occupied[taken]]
        dirty = self.dirty[occupied]
        displaced = occupied[dirty]
        choice = Eviction(slots, self.keys[displaced], self.take_rows(displaced))   # gathers copy
        if clean:
            quiet = occupied[~dirty]
            choice.clean_ids, choice.clean_rows = self.keys[quiet], self.take_rows(quiet)
        return choice

    # --- whole rows of the slab (host memory; the GPU cache has its own kernels) ------------

    def take_rows(self, slots) -> np.ndarray:
        """A copy of the rows in `slots` ([n, row_bytes]), each row prefetched ahead and moved whole."""
        return gather_rows(self.slab, slots)

    def put_rows(self, slots, rows) -> None:
        """Rows ([n, row_bytes]) into `slots`, each moved whole (`host_kernels.scatter_rows`)."""
        scatter_rows(self.slab, slots, rows)

    def fill(self, slots, ids, rows, dirty) -> None:
        """Place rows in the slots `choose_slots` gave (entries of -1 are skipped)."""
        keep = slots >= 0
        if not keep.all():             # skip the copies when every id got a slot
            slots, ids, rows = slots[keep], ids[keep], rows[keep]
            dirty = dirty[keep] if getattr(dirty, "ndim", 0) else dirty
        self.put_rows(slots, rows)
        self._held += fill_slots(slots, ids, self.hints, self.hint_mask, self.keys, self.occupied, self.fingerprints,
                                 self.spilled, self.dirty, dirty, self.last_used, self.tick, self.uses, self.ways)

    # --- maintenance ---------------------------------------------------------

    def keys_of(self, slots):
        return self.keys[slots]

    def flags(self, slots):
        """(occupied, dirty) of `slots`."""
        return self.occupied[slots], self.dirty[slots]

    def clean_slots(self):
        return self.xp.flatnonzero(self.occupied & ~self.dirty)

    def cached_ids(self):
        return self.keys[self.occupied]

    def locked_rows(self) -> int:
        return int((self.locks > 0).sum())

    def set_dirty(self, slots, value: bool) -> None:
        self.dirty[slots] = value

    def lock(self, slots) -> None:
        """Pin unique cached slots (a prefetch lock): they are never victims until unlocked."""
        self.locks[slots] += 1

    def unlock(self, slots) -> None:
        self.locks[slots] = self.xp.maximum(self.locks[slots] - 1, 0)

    def dirty_slots(self):
        return self.xp.nonzero(self.dirty)[0]

    def dirty_rows(self) -> int:
        return int(self.xp.count_nonzero(self.dirty))

    def invalidate(self, ids) -> None:
        """Drop ids from the cache without writing them back."""
        slots = self.probe(ids)
        cached = slots >= 0
        if self.hints is not None:
            self._unhint(ids[cached], slots[cached])
        slots = self.xp.unique(slots[cached])
        self._held -= len(slots)
        self.occupied[slots] = False
        self.dirty[slots] = False
        self.locks[slots] = 0

    def clear(self) -> None:
        if self.hints is not None:
            self.hints[..., 1] = -1
        self.occupied[:] = False
        self.spilled[:] = False
        self._held = 0
        self.dirty[:] = False
        self.locks[:] = 0

    def occupancy(self) -> int:
        return int(self.occupied.sum())
