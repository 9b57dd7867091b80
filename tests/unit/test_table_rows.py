"""Rows of a table: miss modes, deterministic init, dtypes, updates, deletes, validation."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from kvstore import InitializerConfig, InvalidArgument, OptimizerConfig, RowNotFound, Store
from kvstore.dtypes import WEIGHT_DTYPES
from kvstore.initializer import initial_weights

from .conftest import stored_weights, table_config

IDS = np.array([5, -3, 1 << 50, 0], dtype=np.int64)


def expected_init(config, ids) -> np.ndarray:
    return initial_weights(config.initializer, np.asarray(ids), config.dim).astype(np.float32)


# --- misses --------------------------------------------------------------------------


def test_init_insert_returns_initial_rows_and_stores_them(store):
    config = store.create_table(table_config())
    np.testing.assert_array_equal(store.lookup("t", IDS).weights, expected_init(config, IDS))
    store.flush()
    np.testing.assert_array_equal(np.stack(stored_weights(store, "t", IDS)), expected_init(config, IDS))


def test_init_returns_initial_rows_without_storing_them(store):
    config = store.create_table(table_config())
    np.testing.assert_array_equal(store.lookup("t", IDS, on_miss="init").weights, expected_init(config, IDS))
    store.flush()
    assert stored_weights(store, "t", IDS) == [None] * len(IDS)
    with pytest.raises(RowNotFound):
        store.lookup("t", IDS, on_miss="error")


def test_zeros_returns_zero_rows_without_storing_them(store):
    store.create_table(table_config())
    store.update("t", [7], [np.ones(8)])
    result = store.lookup("t", [7, 8, 9], on_miss="zeros").weights
    np.testing.assert_array_equal(result, [np.ones(8), np.zeros(8), np.zeros(8)])
    store.flush()
    assert stored_weights(store, "t", [8, 9]) == [None, None]


def test_error_mode_raises_row_not_found_naming_ids_and_stores_nothing(store):
    store.create_table(table_config())
    store.update("t", [1], [np.ones(8)])
    with pytest.raises(RowNotFound, match="ids"):
        store.lookup("t", [1, 2], on_miss="error")
    store.flush()
    assert stored_weights(store, "t", [2]) == [None]


def test_unknown_on_miss_is_invalid_argument(store):
    store.create_table(table_config())
    with pytest.raises(InvalidArgument, match="on_miss"):
        store.lookup("t", [1], on_miss="guess")


# --- deterministic init -------------------------------------------------------------------


def init_rows(data_dir, seed: int, kind: str = "uniform") -> np.ndarray:
    with Store(data_dir) as store:
        if "t" not in store.list_tables():
            store.create_table(table_config(initializer=InitializerConfig(kind=kind, seed=seed, scale=0.5)))
        return store.lookup("t", IDS, on_miss="init").weights


@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_same_id_gets_same_initial_row_across_reopen_and_stores(tmp_path, kind):
    first = init_rows(str(tmp_path / "a"), seed=3, kind=kind)
    np.testing.assert_array_equal(init_rows(str(tmp_path / "a"), seed=3, kind=kind), first)   # reopened
    np.testing.assert_array_equal(init_rows(str(tmp_path / "b"), seed=3, kind=kind), first)   # another store
    assert not np.array_equal(init_rows(str(tmp_path / "c"), seed=4, kind=kind), first)
    assert len(np.unique(first)) == first.size                                               # no repeats


PINNED_IDS = np.array([5, -3, 1 << 50, 0, 123456789], dtype=np.int64)


def test_initial_rows_are_pinned_across_versions():
    """Rows not yet stored are created on first use, so the initializer's output is part of the
    stored data: a new version must give every id the row an older one would have. Uniform rows
    are integer hashing and exact float steps (compared bit for bit); normal rows also go through
    log and cos, whose last bit may differ between CPUs' vector code."""
    uniform = initial_weights(InitializerConfig(kind="uniform", scale=0.01, seed=0), PINNED_IDS, 24)
    assert hashlib.sha256(uniform.tobytes()).hexdigest()[:32] == "61a6966dd6d0c7e6d090ae2bfb896712"
    uniform = initial_weights(InitializerConfig(kind="uniform", scale=0.5, seed=7), PINNED_IDS, 24)
    assert hashlib.sha256(uniform.tobytes()).hexdigest()[:32] == "5e04669356bc7505860bdc66750a0926"
    normal = initial_weights(InitializerConfig(kind="normal", scale=0.02, seed=3), PINNED_IDS, 24)
    np.testing.assert_allclose(normal[[0, 2, 4]][:, [0, 5, 23]], [
        [0.023934954533198653, 0.0240430776751572, 0.01004584694439591],
        [-0.03550936735634987, -0.022350257186430952, -0.013004635238571633],
        [0.012461015582775506, -0.014070250656594676, -0.00993827815687144]], rtol=1e-12)


def test_uniform_init_lies_within_scale(store):
    store.create_table(table_config(dim=64, initializer=InitializerConfig(kind="uniform", scale=0.05)))
    weights = store.lookup("t", np.arange(-500, 500)).weights
    assert np.abs(weights).max() <= np.float32(0.05)
    assert weights.min() < -0.045 and weights.max() > 0.045      # fills the range
    assert abs(float(weights.mean())) < 0.002


# --- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64", "float32"])
def test_dtype_round_trips_exactly_through_cache_and_rocksdb(data_dir, dtype):
    values = np.random.default_rng(0).standard_normal((len(IDS), 8)).astype(WEIGHT_DTYPES[dtype])
    with Store(data_dir) as store:
        store.create_table(table_config(dtype=dtype))
        store.update("t", IDS, values)
        cached = store.lookup("t", IDS).weights
    with Store(data_dir) as store:
        stored = store.lookup("t", IDS, on_miss="error").weights
    for got in (cached, stored):
        assert got.dtype == WEIGHT_DTYPES[dtype]
        np.testing.assert_array_equal(got.view(np.uint8), values.view(np.uint8))


def test_float64_values_beyond_float32_range_are_accepted(store):
    store.create_table(table_config(dtype="float64"))
    values = np.full((1, 8), 1e300)
    store.update("t", [1], values)
    np.testing.assert_array_equal(store.lookup("t", [1]).weights, values)


# --- updates --------------------------------------------------------------------------------


def test_lookup_after_acknowledged_update_sees_it(store):
    store.create_table(table_config())
    values = np.arange(len(IDS) * 8, dtype=np.float32).reshape(-1, 8)
    store.lookup("t", IDS)                                        # cached initial rows
    store.update("t", IDS, values)
    np.testing.assert_array_equal(store.lookup("t", IDS).weights, values)


def test_update_last_write_wins_within_a_batch(store):
    store.create_table(table_config(dim=2))
    store.update("t", [5, 5, 7, 5, 7], [[1, 1], [2, 2], [3, 3], [4, 4], [5, 5]])
    np.testing.assert_array_equal(store.lookup("t", [5, 7]).weights, [[4, 4], [5, 5]])


@pytest.mark.parametrize("cache_rows", [64, 4], ids=["cached", "evicted"])
def test_update_without_state_keeps_optimizer_state(store, cache_rows):
    store.create_table(table_config(rows=cache_rows, optimizer=OptimizerConfig(name="adagrad")))
    state = np.arange(len(IDS) * 8, dtype=np.float32).reshape(-1, 8) + 1
    store.update("t", IDS, np.zeros((len(IDS), 8)), state=state)
    store.lookup("t", np.arange(100, 104))                       # the tiny cache evicts them
    store.update("t", IDS, np.ones((len(IDS), 8)))
    result = store.lookup("t", IDS, with_state=True)
    np.testing.assert_array_equal(result.weights, np.ones((len(IDS), 8)))
    np.testing.assert_array_equal(result.state, state)


def test_write_through_rows_are_in_rocksdb_immediately(store):
    store.create_table(table_config(write="write_through"))
    values = np.full((len(IDS), 8), 3.5, dtype=np.float32)
    store.update("t", IDS, values)
    np.testing.assert_array_equal(np.stack(stored_weights(store, "t", IDS)), values)
    store.lookup("t", [11, 12])                                   # init_insert persists too
    assert all(row is not None for row in stored_weights(store, "t", [11, 12]))


def test_write_back_rows_wait_for_flush(store):
    store.create_table(table_config())
    store.update("t", [1], np.ones((1, 8)))
    assert stored_weights(store, "t", [1]) == [None]
    store.flush()
    np.testing.assert_array_equal(stored_weights(store, "t", [1])[0], np.ones(8))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_update_is_rejected_and_changes_nothing(store, bad):
    store.create_table(table_config(write="write_through"))
    store.update("t", [1, 2], np.ones((2, 8)))
    values = np.full((2, 8), 9.0)
    values[1, 3] = bad
    with pytest.raises(InvalidArgument, match="weights"):
        store.update("t", [1, 2], values)
    np.testing.assert_array_equal(store.lookup("t", [1, 2]).weights, np.ones((2, 8)))
    np.testing.assert_array_equal(np.stack(stored_weights(store, "t", [1, 2])), np.ones((2, 8)))


def test_nonfinite_state_is_rejected(store):
    store.create_table(table_config(optimizer=OptimizerConfig(name="rowwise_adagrad")))
    with pytest.raises(InvalidArgument, match="state"):
        store.update("t", [1], np.ones((1, 8)), state=[[np.nan]])


def test_allow_nonfinite_table_stores_nan_and_inf(store):
    store.create_table(table_config(dim=2, allow_nonfinite=True))
    store.update("t", [1], [[np.nan, np.inf]])
    got = store.lookup("t", [1]).weights
    assert np.isnan(got[0, 0]) and got[0, 1] == np.inf


@pytest.mark.parametrize(("ids", "weights", "field"), [
    ([1, 2], np.ones((3, 8)), "weights"),
    ([1, 2], np.ones((2, 7)), "weights"),
    ([[1, 2]], np.ones((2, 8)), "ids"),
    ([1.5, 2.5], np.ones((2, 8)), "ids"),
])
def test_malformed_update_is_invalid_argument_naming_the_field(store, ids, weights, field):
    store.create_table(table_config())
    with pytest.raises(InvalidArgument, match=field):
        store.update("t", ids, weights)


# --- deletes and duplicates -----------------------------------------------------------------


def test_delete_removes_rows_from_cache_and_rocksdb(data_dir):
    with Store(data_dir) as store:
        store.create_table(table_config())
        store.update("t", [1, 2, 3], np.ones((3, 8)))
        store.flush()
        store.update("t", [1], np.full((1, 8), 2.0))              # dirty again in the cache
        assert store.delete("t", [1, 2, 2, 99]) == 3
        assert stored_weights(store, "t", [1, 2]) == [None, None]
        with pytest.raises(RowNotFound):
            store.lookup("t", [1], on_miss="error")
        with pytest.raises(RowNotFound):
            store.lookup("t", [2], on_miss="error")
    with Store(data_dir) as store:                                # close wrote nothing back
        assert stored_weights(store, "t", [1, 2]) == [None, None]
        np.testing.assert_array_equal(store.lookup("t", [3], on_miss="error").weights, np.ones((1, 8)))


def test_lookup_with_duplicates_returns_rows_in_request_order(store):
    store.create_table(table_config(dim=1))
    store.update("t", [1, 2, 3], [[10], [20], [30]])
    request = [3, 1, 3, 2, 1, 3]
    expected = [[30], [10], [30], [20], [10], [30]]
    np.testing.assert_array_equal(store.lookup("t", request).weights, expected)     # cache hits
    store.close()
    with Store(store.data_dir) as reopened:                                          # misses
        np.testing.assert_array_equal(reopened.lookup("t", request, on_miss="error").weights, expected)
        np.testing.assert_array_equal(reopened.lookup("t", request + [4], on_miss="zeros").weights,
                                      expected + [[0]])


def test_lookup_with_state_returns_state_in_request_order(store):
    store.create_table(table_config(dim=2, optimizer=OptimizerConfig(name="rowwise_adagrad")))
    store.update("t", [1, 2], np.zeros((2, 2)), state=[[1.0], [2.0]])
    result = store.lookup("t", [2, 1, 2, 5], with_state=True)
    np.testing.assert_array_equal(result.state, [[2.0], [1.0], [2.0], [0.0]])


def test_cached_lookups_gather_contiguous_columns_in_request_order(store):
    """Weights and state come out as their own contiguous arrays, duplicates included."""
    store.create_table(table_config(dim=3, optimizer=OptimizerConfig(name="adam")))
    ids = np.arange(50, dtype=np.int64)
    weights = np.random.default_rng(1).standard_normal((50, 3)).astype(np.float32)
    state = np.random.default_rng(2).random((50, 6)).astype(np.float32)
    store.update("t", ids, weights, state=state)
    request = np.array([7, 3, 7, 49, 0], dtype=np.int64)
    result = store.lookup("t", request, with_state=True, on_miss="error")
    assert result.weights.flags.c_contiguous and result.state.flags.c_contiguous
    np.testing.assert_array_equal(result.weights, weights[request])
    np.testing.assert_array_equal(result.state, state[request])


def test_lookup_of_sorted_distinct_ids_returns_each_ids_own_row_from_every_tier(data_dir):
    with Store(data_dir) as store:
        store.create_table(table_config(rows=64, ways=4))         # 64 slots: most stored rows are evicted
        stored = np.arange(0, 400, 2, dtype=np.int64)
        store.update("t", stored, np.repeat(stored[:, None], 8, axis=1).astype(np.float32))
        ids = np.arange(-10, 420, dtype=np.int64)                  # sorted, distinct: cached, stored, absent
        weights = store.lookup("t", ids, on_miss="zeros").weights
    expected = np.where(np.isin(ids, stored) & (ids >= 0), ids, 0).astype(np.float32)
    np.testing.assert_array_equal(weights, np.repeat(expected[:, None], 8, axis=1))
