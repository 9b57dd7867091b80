"""Admission: an id is stored only after it has been seen `min_count` times.

Sightings of ids not yet stored are counted in a count-min sketch (4 rows of
`width` uint32 counters): memory is fixed however many distinct ids pass, and
an estimate never undercounts, so an id is never admitted late, only at worst
early (when it collides with frequent ids). Like TinyLFU, the sketch halves
every counter once it has counted 10 x width sightings, so ids seen long ago
fade instead of filling the sketch. The sketch lives in memory: after a
restart, ids not yet admitted start counting again.
"""
from __future__ import annotations

import threading

import numpy as np

from ..initializer import splitmix64

DEPTH = 4
_SEEDS = np.array([0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0, 0x082EFA98EC4E6C89],
                  dtype=np.uint64)


class CountMinSketch:
    def __init__(self, width: int):
        self.width = width
        self.counters = np.zeros((DEPTH, width), dtype=np.uint32)
        self.added = 0
        self._lock = threading.Lock()

    def _cells(self, ids: np.ndarray) -> np.ndarray:
        """[DEPTH, n] flat counter index of each id in each row."""
        keys = ids.astype(np.int64, copy=False).view(np.uint64)
        cols = splitmix64(keys[None, :] ^ _SEEDS[:, None]) % np.uint64(self.width)
        return cols.astype(np.int64) + (np.arange(DEPTH, dtype=np.int64) * self.width)[:, None]

    def add(self, ids: np.ndarray) -> np.ndarray:
        """Count one sighting of each id (duplicates count each); returns estimates after counting."""
        cells = self._cells(ids)
        flat = self.counters.reshape(-1)
        with self._lock:
            np.add.at(flat, cells.reshape(-1), 1)
            estimate = flat[cells].min(axis=0)
            self.added += len(ids)
            if self.added >= 10 * self.width:
                self.counters >>= 1
                self.added //= 2
        return estimate

    def estimate(self, ids: np.ndarray) -> np.ndarray:
        return self.counters.reshape(-1)[self._cells(ids)].min(axis=0)


class Admission:
    """Gate in front of row creation: `admit(ids)` counts a sighting and says who may be stored."""

    def __init__(self, min_count: int, width: int):
        self.min_count = min_count
        self.sketch = CountMinSketch(width) if min_count > 1 else None

    def admit(self, ids: np.ndarray) -> np.ndarray:
        if self.sketch is None or len(ids) == 0:
            return np.ones(len(ids), dtype=bool)
        return self.sketch.add(ids) >= self.min_count

    def admitted(self, ids: np.ndarray) -> np.ndarray:
        """Whether ids have been seen often enough, without counting a sighting."""
        if self.sketch is None or len(ids) == 0:
            return np.ones(len(ids), dtype=bool)
        return self.sketch.estimate(ids) >= self.min_count
