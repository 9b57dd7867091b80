"""Row metadata for eviction: last access and access count in every tier, kept by lookup,
update and apply_gradients; read-only accesses reach RocksDB lazily; admission."""
from __future__ import annotations

import numpy as np
import pytest

from kvstore import EvictionConfig, InvalidArgument, RowNotFound, Store, SweeperConfig
from kvstore.initializer import initial_weights
from kvstore.rows import RowLayout, decode_scores, encode_keys

from .conftest import stored_weights, table_config

IDS = np.arange(10, dtype=np.int64)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(data_dir, clock):
    with Store(data_dir, clock=clock, sweeper=SweeperConfig(enabled=False)) as opened:
        yield opened


def stored_headers(store: Store, table: str, ids) -> np.ndarray:
    """Headers as RocksDB holds them; every id must be stored."""
    layout = RowLayout.of(store.describe_table(table))
    store.writer.drain()
    values = store.rocks.get(store.table(table).family, encode_keys(np.asarray(ids, dtype=np.int64)))
    assert all(v is not None for v in values)
    return layout.header(layout.from_values(values)).copy()


def cached_headers(store: Store, table: str, ids) -> np.ndarray:
    handle = store.table(table)
    slots = handle.cache.probe(np.asarray(ids, dtype=np.int64))
    assert (slots >= 0).all()
    return handle.layout.header(handle.cache.slab)[slots].copy()


TTL = EvictionConfig(ttl_seconds=3600, touch_seconds=60)


def test_lookup_update_and_gradients_count_accesses_and_stamp_the_time(store, clock):
    store.create_table(table_config(eviction=TTL))
    store.lookup("t", IDS)                                    # created: one access
    clock.now += 5
    store.lookup("t", IDS[:4])                                # cache hits
    clock.now += 5
    store.update("t", IDS[2:6], np.ones((4, 8)))
    clock.now += 5
    store.table("t").apply_gradients(IDS[5:7], np.ones((2, 8)))
    header = cached_headers(store, "t", IDS)
    np.testing.assert_array_equal(header["count"], [2, 2, 3, 3, 2, 3, 2, 1, 1, 1])
    t0 = 1_000_000
    np.testing.assert_array_equal(header["last_access"], [t0 + 5] * 2 + [t0 + 10] * 3 + [t0 + 15] * 2 + [t0] * 3)


def test_a_read_only_hit_does_not_mark_the_row_dirty(store):
    store.create_table(table_config(eviction=TTL))
    store.lookup("t", IDS)
    store.flush()
    store.lookup("t", IDS)
    assert store.stats("t")["cache_dirty_rows"] == 0


def test_read_accesses_reach_rocksdb_at_flush_once_they_moved_by_touch_seconds(store, clock):
    store.create_table(table_config(eviction=TTL))
    store.lookup("t", IDS)
    store.flush()
    written = store.stats("t")["rows_written"]
    clock.now += 30                                           # under touch_seconds: RocksDB keeps the old time
    store.lookup("t", IDS[:3])
    store.flush()
    assert store.stats("t")["rows_written"] == written
    assert (stored_headers(store, "t", IDS[:3])["last_access"] == 1_000_000).all()
    clock.now += 31
    store.lookup("t", IDS[:3])
    store.flush()
    assert store.stats("t")["rows_written"] == written + 3
    header = stored_headers(store, "t", IDS)
    np.testing.assert_array_equal(header["last_access"][:3], 1_000_061)
    np.testing.assert_array_equal(header["count"][:3], 3)


def test_a_clean_row_leaving_the_cache_takes_its_new_access_time_to_rocksdb(store, clock):
    store.create_table(table_config(rows=4, ways=4, eviction=TTL))   # one set of four ways
    store.lookup("t", IDS[:4])
    store.flush()
    clock.now += 100
    store.lookup("t", IDS[:1])                                # clean, touched
    store.lookup("t", IDS[4:8])                               # pushes all four out
    assert stored_headers(store, "t", IDS[:1])["last_access"][0] == 1_000_100
    assert stored_headers(store, "t", IDS[1:4])["last_access"].tolist() == [1_000_000] * 3


def test_accesses_of_a_dirty_row_leave_the_cache_with_it(store, clock):
    store.create_table(table_config(rows=4, ways=4, eviction=TTL))
    store.update("t", IDS[:4], np.ones((4, 8)))              # dirty, count 1
    clock.now += 7
    for _ in range(3):
        store.lookup("t", IDS[:1])                          # three hits on a dirty row
    store.lookup("t", IDS[4:8])                             # pushes all four out: written back
    header = stored_headers(store, "t", IDS[:4])
    np.testing.assert_array_equal(header["count"], [4, 1, 1, 1])
    np.testing.assert_array_equal(header["last_access"], [1_000_007] + [1_000_000] * 3)


def test_tables_without_eviction_rules_never_write_for_reads(store, clock):
    store.create_table(table_config(rows=4, ways=4))
    store.lookup("t", IDS[:4])
    store.flush()
    written = store.stats("t")["rows_written"]
    clock.now += 10_000
    store.lookup("t", IDS[:4])
    store.lookup("t", IDS[4:8])
    store.flush()
    assert store.stats("t")["rows_written"] == written + 4    # only the four new rows


def test_lookups_that_do_not_insert_create_no_rows(store):
    store.create_table(table_config(eviction=EvictionConfig(max_rows=100)))
    store.lookup("t", IDS, on_miss="zeros")
    store.lookup("t", IDS, on_miss="init")
    store.flush()
    assert stored_weights(store, "t", IDS) == [None] * len(IDS)
    assert store.table("t").eviction.rows == 0
    store.lookup("t", IDS)
    assert store.table("t").eviction.rows == len(IDS)


def test_row_count_follows_creates_updates_deletes_and_survives_reopen(data_dir, clock):
    with Store(data_dir, clock=clock, sweeper=SweeperConfig(enabled=False)) as store:
        store.create_table(table_config(eviction=EvictionConfig(max_rows=100)))
        store.lookup("t", IDS)
        store.update("t", np.arange(5, 15), np.ones((10, 8)))
        store.table("t").apply_gradients(np.arange(12, 20), np.ones((8, 8)))
        store.delete("t", np.arange(18, 30))
        assert store.table("t").eviction.rows == 18
    with Store(data_dir, clock=clock, sweeper=SweeperConfig(enabled=False)) as store:
        assert store.table("t").eviction.rows == 18


def test_scores_from_updates_and_gradients_land_in_the_header(store):
    store.create_table(table_config(eviction=EvictionConfig(max_rows=100, capacity_policy="score")))
    store.update("t", IDS[:3], np.ones((3, 8)), scores=[0.5, 2.0, -1.0])
    store.apply_gradients("t", [3, 4, 3], np.ones((3, 8)), scores=[1.0, 7.0, 9.0])
    score = decode_scores(cached_headers(store, "t", IDS[:5])["score"])
    np.testing.assert_allclose(score, [0.5, 2.0, -1.0, 9.0, 7.0])


# --- admission ----------------------------------------------------------------------------


def test_an_id_is_stored_only_on_its_min_count_sighting(store):
    config = store.create_table(table_config(eviction=EvictionConfig(min_count=3)))
    expected = initial_weights(config.initializer, IDS, 8).astype(np.float32)
    for _ in range(2):                                        # sightings one and two: initial rows, not stored
        np.testing.assert_array_equal(store.lookup("t", IDS).weights, expected)
        with pytest.raises(RowNotFound):
            store.lookup("t", IDS[:1], on_miss="error")
    assert store.stats("t")["admission_rejected"] == 20
    store.lookup("t", IDS[:4])                                # third sighting of four ids
    store.flush()
    assert [w is not None for w in stored_weights(store, "t", IDS)] == [True] * 4 + [False] * 6


def test_gradients_of_ids_not_yet_admitted_are_dropped_but_updates_always_store(store):
    store.create_table(table_config(eviction=EvictionConfig(min_count=2)))
    store.table("t").apply_gradients(IDS[:3], np.ones((3, 8)))
    store.update("t", IDS[3:5], np.ones((2, 8)))
    store.flush()
    assert [w is not None for w in stored_weights(store, "t", IDS[:6])] == [False] * 3 + [True] * 2 + [False]
    store.lookup("t", IDS[:3])
    store.lookup("t", IDS[:3])                                # admitted on the second sighting
    assert store.table("t").apply_gradients(IDS[:3], np.ones((3, 8))) == 3
    store.flush()
    assert all(w is not None for w in stored_weights(store, "t", IDS[:3]))


@pytest.mark.parametrize("scores", [[1.0, float("nan")], [1.0], [[1.0, 2.0]], ["a", "b"]])
def test_bad_scores_are_invalid_argument_and_change_nothing(store, scores):
    store.create_table(table_config(eviction=EvictionConfig(max_rows=100)))
    with pytest.raises(InvalidArgument, match="scores"):
        store.update("t", [1, 2], np.ones((2, 8)), scores=scores)
    assert store.stats("t")["rows"] == 0
    store.flush()
    assert stored_weights(store, "t", [1, 2]) == [None, None]
