"""A full disk, for real: the store lives on a small tmpfs that a filler file fills up.

Promises checked: a write that fails changes nothing (cache and RocksDB), so a retry
never applies a step twice; the store enters a fault state (writes refused, reads
served); it recovers by itself once space returns, with no acknowledged row lost;
closing during the fault does not raise. Skipped where tmpfs cannot be mounted.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
from small_disk import fill, free, mounted

from kvstore import RocksConfig, Store
from kvstore.config import OptimizerConfig
from kvstore.errors import StorageFault

from .conftest import table_config
from .test_eviction_concurrency import wait_for

DISK_BYTES = 24 << 20
ROCKS = RocksConfig(write_buffer_bytes=1 << 20, block_cache_bytes=1 << 20, durability="wal")
DIM = 32


@pytest.fixture
def disk(tmp_path):
    with mounted(tmp_path / "disk") as path:
        yield path


def rows(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def write_until_refused(store: Store, table: str, ids: np.ndarray, acked: dict) -> np.ndarray:
    """Update `ids` with fresh values until the disk refuses; returns the refused batch."""
    for seed in range(10_000):
        batch = rows(seed, len(ids))
        try:
            store.update(table, ids, batch)
        except StorageFault:
            return batch
        acked[table] = batch
    raise AssertionError("the disk never filled up")


def test_a_write_refused_by_a_full_disk_changes_nothing_and_the_store_recovers(disk):
    ids = np.arange(200)
    acked: dict[str, np.ndarray] = {}
    with Store(str(disk / "data"), rocks=ROCKS) as store:
        store.create_table(table_config(name="wt", dim=DIM, rows=256, ways=32, write="write_through",
                                        optimizer=OptimizerConfig(name="adagrad", lr=0.1)))
        store.update("wt", ids, rows(123_456, len(ids)))
        before_step = store.lookup("wt", ids, with_state=True)
        fill(disk)
        refused = write_until_refused(store, "wt", ids, acked)
        assert store.fault is not None and "No space left" in store.fault
        # nothing of the refused batch is visible; reads keep working
        after = store.lookup("wt", ids, with_state=True)
        np.testing.assert_array_equal(after.weights, acked.get("wt", before_step.weights))
        assert not np.array_equal(after.weights, refused)
        with pytest.raises(StorageFault, match="refused"):
            store.apply_gradients("wt", ids, np.ones((len(ids), DIM), np.float32))
        np.testing.assert_array_equal(store.lookup("wt", ids, with_state=True).state, after.state)
        free(disk)
        assert wait_for(lambda: store.fault is None)
        store.apply_gradients("wt", ids, np.ones((len(ids), DIM), np.float32))   # the retry: one step
        stepped = store.lookup("wt", ids, with_state=True)
        np.testing.assert_allclose(stepped.state, after.state + 1.0)
    with Store(str(disk / "data"), rocks=ROCKS) as reopened:
        got = reopened.lookup("wt", ids, on_miss="error", with_state=True)
        np.testing.assert_array_equal(got.weights, stepped.weights)
        np.testing.assert_array_equal(got.state, stepped.state)


def test_write_back_rows_survive_a_full_disk_and_reach_rocksdb_after_it(disk):
    ids = np.arange(5000)
    with Store(str(disk / "data"), rocks=ROCKS) as store:
        store.create_table(table_config(name="wb", dim=DIM, rows=1 << 13, ways=32, flush_seconds=0.05))
        fill(disk)
        acked = None
        for seed in range(200):                 # the flusher hits the full disk; writes are then refused
            try:
                store.update("wb", ids, rows(seed, len(ids)))
            except StorageFault:
                break
            acked = rows(seed, len(ids))
            if store.fault is not None:
                break
        assert wait_for(lambda: store.fault is not None)
        with pytest.raises(StorageFault):
            store.update("wb", ids, rows(999, len(ids)))
        np.testing.assert_array_equal(store.lookup("wb", ids).weights, acked)    # reads go on
        free(disk)
        assert wait_for(lambda: store.fault is None)
        store.flush()
    with Store(str(disk / "data"), rocks=ROCKS) as reopened:
        np.testing.assert_array_equal(reopened.lookup("wb", ids, on_miss="error").weights, acked)


def test_close_during_a_fault_does_not_raise_and_says_what_it_could_not_save(disk, caplog):
    ids = np.arange(5000)
    store = Store(str(disk / "data"), rocks=ROCKS)
    store.create_table(table_config(name="wb", dim=DIM, rows=1 << 13, ways=32))
    store.update("wb", ids, rows(0, len(ids)))
    store.flush()
    store.update("wb", ids, rows(1, len(ids)))            # dirty in the cache only
    fill(disk)
    with caplog.at_level(logging.ERROR):
        store.close()                                       # cannot write them: logs, no exception
    assert "could not" in caplog.text
    free(disk)
    with Store(str(disk / "data"), rocks=ROCKS) as reopened:   # the flushed rows are all there
        got = reopened.lookup("wb", ids, on_miss="error").weights
        assert all(np.array_equal(got[i], rows(0, len(ids))[i]) or np.array_equal(got[i], rows(1, len(ids))[i])
                   for i in range(len(ids)))
