"""The host-memory tier under a GPU tier: HBM -> DRAM -> SSD, as HugeCTR HPS and DeepRec stack them.

Tiers are exclusive: a row is in the GPU tier, in this one, or in neither (then
RocksDB, or the writer's pending rows, has it). Rows the GPU tier displaces,
clean or dirty, move down here with their dirty bit, so a dirty row is written
to RocksDB once, when it leaves the last tier (or at a flush). A GPU miss
looks here before RocksDB, and a row found here moves up. `NoLowerTier` is the
same interface doing nothing, for tables with one tier.
"""
from __future__ import annotations

import numpy as np

from .config import TableConfig
from .rows import RowLayout
from .tiers import HostTier

_NO_IDS = np.zeros(0, np.int64)


class LowerTier:
    def __init__(self, config: TableConfig, layout: RowLayout):
        self.tier = HostTier(config.cache.host_tier(), layout, optimizer=None)
        self.layout = layout

    def read(self, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Copy the rows of unique `ids` held here into `rows`; returns (found, dirty) masks.
        Nothing moves: a caller that promotes them calls `forget` once they are placed."""
        slots = self.tier.probe(ids)
        found = slots >= 0
        dirty = np.zeros(len(ids), dtype=bool)
        if found.any():
            at = np.flatnonzero(found)
            rows[at] = self.tier.rows(slots[at])
            dirty[at] = self.tier.flags(slots[at])[1]
        return found, dirty

    def take_victims(self, ids: np.ndarray, rows: np.ndarray, dirty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keep rows an upper tier displaced (unique ids, not held here); returns the (ids, rows)
        that must reach RocksDB now: dirty rows this tier displaced for them, and dirty rows
        that found no way here."""
        if not len(ids):
            return _NO_IDS, self.layout.empty(0)
        self.tier.invalidate(ids)        # an older copy (left by a call that failed after moving it) goes
        self.tier.begin_batch()
        choice = self.tier.choose_slots(ids)
        self.tier.fill(choice.slots, ids, rows, dirty)
        homeless = (choice.slots < 0) & dirty
        return (np.concatenate([choice.dirty_ids, ids[homeless]]),
                np.concatenate([choice.dirty_rows, rows[homeless]]))

    def cached_ids(self) -> np.ndarray:
        return self.tier.cached_ids()

    def invalidate(self, ids: np.ndarray) -> None:
        self.forget(ids)

    def forget(self, ids: np.ndarray) -> None:
        """Drop rows that moved up, were rewritten above, or were deleted."""
        if len(ids):
            self.tier.invalidate(ids)

    def take_dirty(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) of every dirty row here, which are clean from now on (a flush writes them)."""
        slots = self.tier.dirty_slots()
        ids, rows = self.tier.keys_of(slots), self.tier.rows(slots)
        self.tier.set_dirty(slots, False)
        return ids, rows

    def peek_dirty(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) of every dirty row here; they stay dirty."""
        slots = self.tier.dirty_slots()
        return self.tier.keys_of(slots), self.tier.rows(slots)

    def clear(self) -> None:
        self.tier.clear()

    def stats(self) -> dict[str, float]:
        return {"host_tier_rows": float(self.tier.occupancy()), "host_tier_capacity": float(self.tier.capacity),
                "host_tier_dirty_rows": float(self.tier.dirty_rows())}


class NoLowerTier:
    """A table with one cache tier: misses go straight to RocksDB."""

    def read(self, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(len(ids), dtype=bool), np.zeros(len(ids), dtype=bool)

    def take_victims(self, ids, rows, dirty):
        return ids[dirty], rows[dirty]

    def forget(self, ids: np.ndarray) -> None:
        pass

    invalidate = forget

    def cached_ids(self) -> np.ndarray:
        return _NO_IDS

    def take_dirty(self) -> tuple[np.ndarray, np.ndarray]:
        return _NO_IDS, np.zeros((0, 0), np.uint8)

    peek_dirty = take_dirty

    def clear(self) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {}


def lower_tier_of(config: TableConfig, layout: RowLayout) -> LowerTier | NoLowerTier:
    return LowerTier(config, layout) if config.cache.host_rows else NoLowerTier()
