"""Pieces several suites use: batches with their keys pre-encoded, hit rates from a table's counters."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvstore.rows import encode_keys


@dataclass
class Batch:
    """Ids of one call, with what the raw comparators need prepared outside the timed part."""
    ids: np.ndarray
    keys: list[bytes]
    grads: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def make_batch(ids: np.ndarray, grads: np.ndarray | None = None) -> Batch:
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    return Batch(ids, encode_keys(ids), grads)


def make_batches(sampler, dist: str, batch: int, rows_per_rep: int) -> list[Batch]:
    """Enough batches of `batch` ids to cover `rows_per_rep` ids (at least one)."""
    return [make_batch(ids) for ids in sampler.batches(dist, batch, max(1, rows_per_rep // batch))]


def observed_hit_rate(stats: Callable[[], dict]) -> Callable[[], str]:
    """Reads the cache counters now; the returned function describes the hits since."""
    before = stats()

    def describe() -> str:
        after = stats()
        hits = after.get("cache_hits", 0) - before.get("cache_hits", 0)
        misses = after.get("cache_misses", 0) - before.get("cache_misses", 0)
        return f"hit rate {hits / max(hits + misses, 1):.3f}" if hits + misses else ""

    return describe


def settle_compactions(store, timeout: float = 600.0) -> None:
    """Wait until no RocksDB compaction runs in `store` (one left from loading a table would
    share the cores with the timed calls: a 10M-row table's cached lookups ran at half speed
    beside one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
            gauges.get("running_compactions", 0) for gauges in store.rocks.properties().values()):
        time.sleep(0.2)
