"""Eviction sweeps through the store: each rule end to end, counts by reason, the archive."""
from __future__ import annotations

import numpy as np
import pytest

from kvstore import EvictionConfig, FailedPrecondition, RowNotFound, Store, SweeperConfig
from kvstore.eviction.archive import archived_ids
from kvstore.initializer import initial_weights

from .conftest import stored_weights, table_config
from .test_eviction_metadata import FakeClock, stored_headers

T0 = 1_000_000
FAST = SweeperConfig(enabled=False, rows_per_second=1e7, chunk_rows=64)


@pytest.fixture
def clock():
    return FakeClock(T0)


@pytest.fixture
def store(data_dir, clock):
    with Store(data_dir, clock=clock, sweeper=FAST) as opened:
        yield opened


def present(store: Store, table: str, ids) -> np.ndarray:
    """Which ids have a row, asked through the public API (no row is created)."""
    out = []
    for i in np.asarray(ids):
        try:
            store.lookup(table, [i], on_miss="error")
            out.append(True)
        except RowNotFound:
            out.append(False)
    return np.array(out)


def stored_ids(store: Store, table: str) -> set[int]:
    store.flush()
    keys, _ = store.rocks.scan(store.table(table).family, None, 1 << 40)
    from kvstore.rows import decode_keys

    return set(decode_keys(keys).tolist()) if keys else set()


# --- TTL ------------------------------------------------------------------------------------


def test_ttl_evicts_exactly_the_expired_rows_from_every_tier(store, clock):
    store.create_table(table_config(rows=64, ways=4, eviction=EvictionConfig(ttl_seconds=100)))
    ids = np.arange(300)
    store.lookup("t", ids)                                  # 300 rows, most pushed out of the 64-row cache
    clock.now += 60
    fresh = np.arange(0, 300, 3)
    store.lookup("t", fresh)                                # accessed at T0 + 60 (cached or not)
    clock.now += 50                                         # the rest are 110 s old: expired
    assert store.evict("t") == {"ttl": 200, "norm": 0, "frequency": 0, "capacity": 0, "score": 0}
    assert stored_ids(store, "t") == set(fresh.tolist())
    expected = np.isin(ids, fresh)
    np.testing.assert_array_equal(present(store, "t", ids), expected)
    stats = store.stats("t")
    assert stats["evicted_ttl"] == 200 and stats["evicted_rows"] == 200
    assert stats["sweeps"] == 1 and stats["sweep_rows_scanned"] == 300 and stats["sweep_seconds_last"] > 0


def test_a_dirty_cached_row_that_expired_is_evicted_not_written_back(store, clock):
    store.create_table(table_config(eviction=EvictionConfig(ttl_seconds=100)))
    store.update("t", [1, 2], np.full((2, 8), 5.0))         # dirty in the cache, never flushed
    clock.now += 200
    assert store.evict("t")["ttl"] == 2
    assert store.stats("t")["cache_dirty_rows"] == 0
    assert stored_weights(store, "t", [1, 2]) == [None, None]


def test_an_evicted_row_comes_back_freshly_initialized(store, clock):
    config = store.create_table(table_config(eviction=EvictionConfig(ttl_seconds=100)))
    store.update("t", [7], np.full((1, 8), 3.0))
    clock.now += 101
    store.evict("t")
    expected = initial_weights(config.initializer, np.array([7]), 8).astype(np.float32)
    np.testing.assert_array_equal(store.lookup("t", [7]).weights, expected)


# --- norm, decay, score -----------------------------------------------------------------------


def test_rows_with_a_small_norm_are_evicted(store):
    store.create_table(table_config(eviction=EvictionConfig(min_norm=0.5)))
    weights = np.zeros((6, 8), dtype=np.float32)
    weights[:, 0] = [0.0, 0.1, 0.49, 0.51, 2.0, -3.0]
    store.update("t", np.arange(6), weights)
    assert store.evict("t")["norm"] == 3
    np.testing.assert_array_equal(present(store, "t", np.arange(6)), [False] * 3 + [True] * 3)


def test_counts_decay_each_sweep_and_rows_under_the_threshold_leave(store):
    store.create_table(table_config(eviction=EvictionConfig(decay_rate=0.5, count_threshold=2)))
    store.lookup("t", [1, 2, 3])
    for _ in range(7):
        store.lookup("t", [1])                              # 8 accesses
    store.lookup("t", [2])                                  # 2 accesses; 3 has 1
    assert store.evict("t")["frequency"] == 2               # 8 -> 4, 2 -> 1, 1 -> 0
    assert stored_headers(store, "t", [1])["count"][0] == 4
    assert store.evict("t")["frequency"] == 0               # 4 -> 2
    assert stored_headers(store, "t", [1])["count"][0] == 2
    assert store.evict("t")["frequency"] == 1               # 2 -> 1
    assert store.stats("t")["evicted_frequency"] == 3


def test_at_the_limit_the_lowest_scores_leave_first(store):
    store.create_table(table_config(rows=256, ways=4, eviction=EvictionConfig(
        max_rows=1000, headroom=0.2, capacity_policy="score", samples=32)))
    ids = np.arange(1200)
    scores = np.random.default_rng(1).permutation(1200).astype(np.float32)
    store.update("t", ids, np.ones((1200, 8)), scores=scores)
    counts = store.evict("t")
    assert counts["score"] == 400 and counts["capacity"] == 0
    gone = ~np.isin(ids, list(stored_ids(store, "t")))
    assert gone.sum() == 400
    assert (scores[gone] < 600).mean() >= 0.9               # mostly the lowest half went


# --- capacity -------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_capacity_under_a_zipf_workload_evicts_mostly_cold_rows(store, clock, policy):
    """Zipf(1.2) over 20,000 ids into a table of 2,000 rows, swept every 10 batches: the table
    stays at or under max_rows, and >= 90% of evicted rows are outside the hottest 10% of the
    rows it can hold (the 200 ids of highest probability)."""
    max_rows, universe = 2000, 20_000
    store.create_table(table_config(rows=512, ways=8, eviction=EvictionConfig(
        max_rows=max_rows, headroom=0.1, capacity_policy=policy)))
    rng = np.random.default_rng(7)
    p = np.arange(1, universe + 1, dtype=np.float64) ** -1.2
    p /= p.sum()                                            # id k has the k-th highest probability
    evicted = []
    for _ in range(12):
        for _ in range(10):
            clock.now += 1
            store.lookup("t", rng.choice(universe, 512, p=p))
        before = stored_ids(store, "t")
        counts = store.evict("t")
        after = stored_ids(store, "t")
        assert len(after) <= max_rows and store.table("t").eviction.rows == len(after)
        assert counts["capacity"] == len(before - after)
        evicted.extend(before - after)
    evicted = np.array(evicted)
    assert len(evicted) > 3000
    assert (evicted >= max_rows // 10).mean() >= 0.9


# --- archive --------------------------------------------------------------------------------


def test_archived_rows_can_be_restored_until_their_retention_ends(store, clock):
    store.create_table(table_config(eviction=EvictionConfig(ttl_seconds=100, archive_seconds=1000)))
    weights = np.arange(40, dtype=np.float32).reshape(5, 8)
    store.update("t", np.arange(5), weights)
    clock.now += 200
    assert store.evict("t")["ttl"] == 5
    assert sorted(archived_ids(store.table("t"))) == list(range(5))
    assert store.stats("t")["archived_rows"] == 5
    store.update("t", [4], np.full((1, 8), -1.0))           # id 4 lives again: restore leaves it alone
    assert store.restore_rows("t", [0, 1, 4, 99]) == 2
    np.testing.assert_array_equal(store.lookup("t", [0, 1], on_miss="error").weights, weights[:2])
    np.testing.assert_array_equal(store.lookup("t", [4]).weights, np.full((1, 8), -1.0))
    assert store.evict("t")["ttl"] == 0                     # restored rows count as accessed now
    clock.now += 1001
    store.evict("t")                                        # evicts 0, 1, 4 again; purges 2 and 3
    assert store.stats("t")["archive_purged"] == 2
    assert store.restore_rows("t", [2, 3]) == 0
    assert store.restore_rows("t", [0]) == 1


def test_without_an_archive_rows_are_deleted_and_restore_is_refused(store, clock):
    store.create_table(table_config(eviction=EvictionConfig(ttl_seconds=1)))
    store.lookup("t", [1])
    clock.now += 5
    assert store.evict("t")["ttl"] == 1
    with pytest.raises(FailedPrecondition, match="archive"):
        store.restore_rows("t", [1])


def test_dropping_a_table_drops_its_archive(store):
    store.create_table(table_config(eviction=EvictionConfig(ttl_seconds=1, archive_seconds=60)))
    family = store.table("t").archive_family
    assert family in store.rocks.families()
    store.drop_table("t")
    assert family not in store.rocks.families()


def test_eviction_config_persists_with_the_table(data_dir, clock):
    eviction = EvictionConfig(ttl_seconds=5, max_rows=10, capacity_policy="lfu", archive_seconds=9)
    with Store(data_dir, clock=clock, sweeper=FAST) as store:
        store.create_table(table_config(eviction=eviction))
    with Store(data_dir, clock=clock, sweeper=FAST) as store:
        assert store.describe_table("t").eviction == eviction


def test_a_table_without_rules_is_not_scanned(store):
    store.create_table(table_config())
    store.lookup("t", np.arange(50))
    assert store.evict("t") == {"ttl": 0, "norm": 0, "frequency": 0, "capacity": 0, "score": 0}
    assert store.stats("t")["sweep_rows_scanned"] == 0
    assert all(present(store, "t", np.arange(50)))
