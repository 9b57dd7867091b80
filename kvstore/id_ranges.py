"""Closed ranges of ids, [lo, hi] per row of an [R, 2] int64 array: what an import changed.

An import is recorded by the key ranges it covered, not by its ids, so its memory
is bounded by its chunks (a few ranges), not by its rows. A range may cover ids the
import did not bring (gaps between its rows): every reader treats a range as "these
ids may have changed" (re-read them, drop cached copies of them), which stays correct
for a superset.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

MAX_RANGES = 64     # more ranges than this are recorded as one covering range
NO_RANGES = np.zeros((0, 2), np.int64)


def coalesce(ranges: Iterable[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """Sorted, non-overlapping [R, 2] ranges covering `ranges`; at most MAX_RANGES (beyond that,
    one range from the lowest to the highest id)."""
    spans = np.asarray(list(ranges) if not isinstance(ranges, np.ndarray) else ranges, np.int64).reshape(-1, 2)
    if not len(spans):
        return NO_RANGES
    spans = spans[np.argsort(spans[:, 0], kind="stable")]
    ends = np.maximum.accumulate(spans[:, 1])
    # a range starts a new group when it begins after every earlier one ends
    starts = np.ones(len(spans), bool)
    starts[1:] = spans[1:, 0] > ends[:-1]
    first = np.flatnonzero(starts)
    last = np.append(first[1:] - 1, len(spans) - 1)
    merged = np.stack([spans[first, 0], ends[last]], axis=1)
    if len(merged) > MAX_RANGES:
        return np.array([[merged[0, 0], merged[-1, 1]]], np.int64)
    return merged


def covers(ranges: np.ndarray, ids):
    """Boolean mask of `ids` inside any of `ranges` (works on NumPy and CuPy ids alike: elementwise
    comparisons only, one pass per range)."""
    inside = ids < ids          # all False, in the ids' own array module
    for lo, hi in ranges.tolist():
        inside |= (ids >= lo) & (ids <= hi)
    return inside
