"""`Store.lookup_if_cached` and `Store.apply_gradients_if_cached`: what `lookup` and `apply_gradients`
do when every id is cached and the table is free at once; otherwise None, without waiting and with
nothing changed (the server runs them on its event loop)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from held_clock import HeldClock

from kvstore import OptimizerConfig, Store

from .conftest import table_config


def _filled(store: Store, name: str = "t", rows: int = 32, dim: int = 8) -> np.ndarray:
    store.create_table(table_config(name, dim=dim, rows=64, ways=4, write="write_through"))
    weights = np.random.default_rng(3).standard_normal((rows, dim)).astype(np.float32)
    store.update(name, np.arange(rows), weights)
    return weights


def test_every_id_cached_gives_the_rows_lookup_gives_duplicates_and_order_kept(store):
    weights = _filled(store)
    ids = np.array([5, 1, 5, 31, 0])
    found = store.lookup_if_cached("t", ids)
    assert found is not None and found.state is None
    np.testing.assert_array_equal(found.weights, weights[ids])
    np.testing.assert_array_equal(found.weights, store.lookup("t", ids).weights)


def test_with_state_gives_the_state_lookup_gives(store):
    store.create_table(table_config("adagrad", dim=4, optimizer=OptimizerConfig(name="adagrad", lr=0.1)))
    store.apply_gradients("adagrad", [1, 2], np.ones((2, 4), np.float32))
    found = store.lookup_if_cached("adagrad", [2, 1], with_state=True)
    expected = store.lookup("adagrad", [2, 1], with_state=True)
    np.testing.assert_array_equal(found.weights, expected.weights)
    np.testing.assert_array_equal(found.state, expected.state)


def test_a_cached_lookup_counts_its_hits(store):
    _filled(store)
    before = store.stats("t").get("cache_hits", 0)
    store.lookup_if_cached("t", [1, 2, 3])
    assert store.stats("t")["cache_hits"] == before + 3


def test_one_uncached_id_gives_none_and_changes_nothing(store):
    _filled(store)
    counted = ("cache_hits", "cache_misses", "rows_initialized", "rows_read", "cache_rows")
    before = {key: store.stats("t").get(key, 0) for key in counted}
    assert store.lookup_if_cached("t", [1, 2, 1000]) is None
    assert {key: store.stats("t").get(key, 0) for key in counted} == before   # no hit, miss or new row
    assert not store.lookup("t", [1000], on_miss="zeros").weights.any()     # 1000 was not created


def test_a_busy_table_gives_none_at_once_and_the_rows_once_it_is_free(data_dir):
    clock = HeldClock()
    with Store(data_dir, clock=clock) as store:
        weights = _filled(store)
        holder = threading.Thread(target=store.lookup, args=("t", [7]))
        clock.arm(lambda thread: thread is holder)
        holder.start()
        try:
            assert clock.holding.wait(60)                  # the holder's lookup is inside the table lock
            assert store.lookup_if_cached("t", [1, 2]) is None     # returns: it did not wait for the lock
        finally:
            clock.release()
            holder.join(60)
        np.testing.assert_array_equal(store.lookup_if_cached("t", [1, 2]).weights, weights[[1, 2]])


ROWWISE = OptimizerConfig(name="rowwise_adagrad", lr=0.1)


def _twins(store: Store, write: str = "write_back") -> np.ndarray:
    """Tables `a` and `b` holding the same 32 cached rows (rowwise Adagrad)."""
    weights = np.random.default_rng(4).standard_normal((32, 8)).astype(np.float32)
    for name in "ab":
        store.create_table(table_config(name, rows=64, ways=4, write=write, optimizer=ROWWISE))
        store.update(name, np.arange(32), weights)
    return weights


def _rows(store: Store, name: str) -> tuple[np.ndarray, np.ndarray]:
    found = store.lookup(name, np.arange(32), on_miss="error", with_state=True)
    return found.weights, found.state


def test_a_step_of_cached_rows_is_the_step_apply_gradients_takes(store):
    """Duplicates summed, one step per row: the same bits as `apply_gradients` on a twin table."""
    _twins(store)
    rng = np.random.default_rng(5)
    for _ in range(3):
        ids = rng.integers(0, 32, 50)
        grads = rng.standard_normal((50, 8)).astype(np.float32)
        assert store.apply_gradients_if_cached("a", ids, grads) == store.apply_gradients("b", ids, grads) \
            == len(np.unique(ids))
    for got, want in zip(_rows(store, "a"), _rows(store, "b"), strict=True):
        assert got.tobytes() == want.tobytes()
    assert store.stats("a")["rows_stepped"] == store.stats("b")["rows_stepped"]


def test_a_step_that_would_wait_or_write_rocksdb_gives_none_and_changes_nothing(data_dir):
    """An uncached id, a write_through table, a busy table lock and a snapshot's pause each give None
    at once, with every row and its state as they were."""
    clock = HeldClock()
    with Store(data_dir, clock=clock) as store:
        _twins(store)
        store.create_table(table_config("through", rows=64, ways=4, write="write_through", optimizer=ROWWISE))
        store.update("through", np.arange(32), np.zeros((32, 8), np.float32))
        before = {name: _rows(store, name) for name in ("a", "through")}
        grads = np.ones((2, 8), np.float32)
        assert store.apply_gradients_if_cached("a", [1, 1000], grads) is None
        assert store.apply_gradients_if_cached("through", [1, 2], grads) is None
        with store.gate.paused():
            assert store.apply_gradients_if_cached("a", [1, 2], grads) is None
        holder = threading.Thread(target=store.lookup, args=("a", [7]))
        clock.arm(lambda thread: thread is holder)
        holder.start()
        try:
            assert clock.holding.wait(60)                  # the holder's lookup is inside the table lock
            assert store.apply_gradients_if_cached("a", [1, 2], grads) is None
        finally:
            clock.release()
            holder.join(60)
        for name, rows in before.items():
            for got, want in zip(_rows(store, name), rows, strict=True):
                np.testing.assert_array_equal(got, want)
        assert not store.lookup("a", [1000], on_miss="zeros").weights.any()     # 1000 was not created
        assert store.apply_gradients_if_cached("a", [1, 2], grads) == 2         # free again: it runs


def test_bad_gradients_raise_as_apply_gradients_does(store):
    from kvstore.errors import InvalidArgument

    _twins(store)
    with pytest.raises(InvalidArgument, match="grads"):
        store.apply_gradients_if_cached("a", [1, 2], np.full((2, 8), np.nan, np.float32))
    with pytest.raises(InvalidArgument, match="grads"):
        store.apply_gradients_if_cached("a", [1, 2], np.ones((3, 8), np.float32))
