"""The cache tier: a set-associative cache of rows in their stored layout.

S sets x W ways. Each slot holds one row (header, weights, optimizer state:
the exact bytes RocksDB stores), its key, an occupied bit, a dirty bit, a lock
count and the stamps the victim choice reads. The code is written against an
array module `xp` (NumPy here; the GPU tier runs the same design in HBM), and
every batch path is vectorized: no Python loop per row.

Victim choice is the only policy-specific part: `VictimOrder` ranks the ways
of a set (LRU: oldest use first; LFU: fewest uses, then oldest). Slots that are
locked, or that the current batch already uses, are never victims, so a batch
with many misses to one set never gives one slot to two ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import CacheConfig

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_NEVER = np.iinfo(np.int64).max      # sort key of a slot that may not be a victim
_EMPTY = np.int64(-1)                # sort key of an empty slot: taken first


class VictimOrder:
    """Ranks occupied slots for eviction: smaller key leaves first."""

    def on_insert(self, cache: SetAssociativeCache, slots) -> None:
        cache.uses[slots] = 1

    def on_hit(self, cache: SetAssociativeCache, slots) -> None:
        cache.uses[slots] += 1

    def key(self, cache: SetAssociativeCache, slots):
        raise NotImplementedError


class LRU(VictimOrder):
    def key(self, cache, slots):
        return cache.last_used[slots]


class LFU(VictimOrder):
    def key(self, cache, slots):
        # fewest uses first, ties broken by age; counts saturate at 2**30
        uses = cache.xp.minimum(cache.uses[slots], (1 << 30) - 1)
        return (uses << 32) | (cache.last_used[slots] & 0xFFFFFFFF)


POLICIES = {"lru": LRU, "lfu": LFU}


@dataclass
class Eviction:
    """Slots chosen for a batch of new ids, and the dirty rows they displace."""

    slots: np.ndarray          # [n] slot per new id, -1 where its set had no free way
    dirty_ids: np.ndarray      # ids of displaced dirty rows: write them back before `fill`
    dirty_rows: np.ndarray     # [k, row_bytes] their rows


class SetAssociativeCache:
    def __init__(self, config: CacheConfig, row_bytes: int, xp=np):
        self.xp = xp
        self.ways = config.ways
        self.num_sets = config.rows // config.ways
        self.capacity = config.rows
        self.row_bytes = row_bytes
        self.order = POLICIES[config.policy]()
        n = config.rows
        self.keys = xp.zeros(n, dtype=xp.int64)
        self.occupied = xp.zeros(n, dtype=bool)
        self.dirty = xp.zeros(n, dtype=bool)
        self.locks = xp.zeros(n, dtype=xp.int32)
        self.last_used = xp.zeros(n, dtype=xp.int64)   # batch tick of the last use
        self.uses = xp.zeros(n, dtype=xp.int64)
        self.slab = xp.zeros((n, row_bytes), dtype=xp.uint8)
        self.tick = 0

    # --- lookup ------------------------------------------------------------

    def begin_batch(self) -> None:
        """Start a batch: slots used from now on are protected from eviction until the next."""
        self.tick += 1

    def set_of(self, ids):
        xp = self.xp
        mixed = ids.astype(xp.int64, copy=False).view(xp.uint64) * _GOLDEN
        return ((mixed >> np.uint64(32)) % np.uint64(self.num_sets)).astype(xp.int64)

    def probe(self, ids):
        """Slot of each id, -1 where it is not cached. Pure: changes no stamp."""
        xp = self.xp
        sets = self.set_of(ids)
        first = sets * self.ways
        window = first[:, None] + xp.arange(self.ways, dtype=xp.int64)[None, :]
        match = (self.keys[window] == ids[:, None]) & self.occupied[window]
        way = match.argmax(axis=1)
        found = match[xp.arange(len(ids)), way]
        return xp.where(found, first + way, -1)

    def touch(self, slots) -> None:
        """Record a use of cached slots (duplicates allowed)."""
        self.last_used[slots] = self.tick
        self.order.on_hit(self, slots)

    # --- insert --------------------------------------------------------------

    def choose_slots(self, ids) -> Eviction:
        """Pick a slot for each new (unique, uncached) id. Changes nothing yet:
        the caller writes the dirty victims back, then calls `fill`."""
        xp = self.xp
        n = len(ids)
        if n == 0:
            return Eviction(xp.zeros(0, xp.int64), xp.zeros(0, xp.int64),
                            xp.zeros((0, self.row_bytes), xp.uint8))
        sets = self.set_of(ids)
        order = xp.argsort(sets, kind="stable")
        sorted_sets = sets[order]
        uniq_sets, first, counts = xp.unique(sorted_sets, return_index=True, return_counts=True)
        rank_sorted = xp.arange(n) - xp.repeat(first, counts)
        rank = xp.empty(n, dtype=xp.int64)
        rank[order] = rank_sorted
        # Rank the ways of each involved set: empty, then by policy; never locked
        # slots or slots the current batch has used.
        window = uniq_sets[:, None] * self.ways + xp.arange(self.ways, dtype=xp.int64)[None, :]
        key = self.order.key(self, window)
        key = xp.where(self.occupied[window], key, _EMPTY)
        blocked = (self.locks[window] > 0) | (self.occupied[window] & (self.last_used[window] == self.tick))
        key = xp.where(blocked, _NEVER, key)
        ranked = xp.argsort(key, axis=1, kind="stable")
        set_pos = xp.searchsorted(uniq_sets, sets)
        usable = rank < self.ways
        way = ranked[set_pos, xp.minimum(rank, self.ways - 1)]
        usable &= key[set_pos, way] != _NEVER
        slots = xp.where(usable, window[set_pos, way], -1)
        taken = slots[usable]
        displaced = taken[self.occupied[taken] & self.dirty[taken]]
        return Eviction(slots, self.keys[displaced].copy(), self.slab[displaced].copy())

    def fill(self, slots, ids, rows, dirty) -> None:
        """Place rows in the slots `choose_slots` gave (entries of -1 are skipped)."""
        keep = slots >= 0
        slots = slots[keep]
        self.keys[slots] = ids[keep]
        self.occupied[slots] = True
        self.slab[slots] = rows[keep]
        self.dirty[slots] = dirty[keep] if getattr(dirty, "ndim", 0) else bool(dirty)
        self.last_used[slots] = self.tick
        self.order.on_insert(self, slots)

    # --- maintenance ---------------------------------------------------------

    def dirty_slots(self):
        return self.xp.nonzero(self.dirty)[0]

    def invalidate(self, ids) -> None:
        """Drop ids from the cache without writing them back."""
        slots = self.probe(ids)
        slots = slots[slots >= 0]
        self.occupied[slots] = False
        self.dirty[slots] = False
        self.locks[slots] = 0

    def clear(self) -> None:
        self.occupied[:] = False
        self.dirty[:] = False
        self.locks[:] = 0

    def occupancy(self) -> int:
        return int(self.occupied.sum())
