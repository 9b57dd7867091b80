"""One interface, two cache tiers: every test runs on the host tier, and on the GPU tier where
CuPy and a CUDA device exist (skipped elsewhere)."""
from __future__ import annotations

import numpy as np
import pytest
from gpu.conftest import gpu_usable

from kvstore import CacheConfig, OptimizerConfig, TableConfig
from kvstore.optimizers import make_optimizer, step_rows
from kvstore.rows import RowLayout
from kvstore.tiers import make_tier

DIM = 8
NOW = 1_700_000_000


DEVICES = ["cpu", pytest.param("cuda:0", marks=pytest.mark.skipif(not gpu_usable(), reason="no CUDA device"))]


def config(device: str, rows: int = 64, policy: str = "lru", optimizer: str = "adam") -> TableConfig:
    return TableConfig(name="t", dim=DIM, optimizer=OptimizerConfig(name=optimizer, lr=0.1),
                       cache=CacheConfig(rows=rows, ways=32, policy=policy, device=device))


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def tier_of(cfg: TableConfig):
    layout = RowLayout.of(cfg)
    return make_tier(cfg, layout), layout


def rows_for(layout: RowLayout, ids: np.ndarray) -> np.ndarray:
    rows = layout.empty(len(ids))
    layout.weights(rows)[:] = ids[:, None] + np.arange(DIM, dtype=np.float32) / 10
    layout.state(rows)[:] = np.abs(ids[:, None]).astype(np.float32) % 97   # accumulators are >= 0
    return rows


def insert(tier, layout, ids: np.ndarray, dirty: bool = False) -> np.ndarray:
    tier.begin_batch()
    choice = tier.choose_slots(ids)
    tier.fill(choice.slots, ids, rows_for(layout, ids), dirty)
    return choice.slots


def test_filled_rows_are_found_and_gathered_column_by_column(device):
    tier, layout = tier_of(config(device))
    ids = np.array([7, -3, 1 << 40, 12], dtype=np.int64)
    slots = insert(tier, layout, ids)
    assert (slots >= 0).all() and len(set(slots.tolist())) == 4
    np.testing.assert_array_equal(tier.probe(ids), slots)
    assert (tier.probe(np.array([8, 9])) == -1).all()
    query = np.array([12, 7, 12], dtype=np.int64)
    weights, state = tier.columns(tier.probe(query), with_state=True)
    expect = rows_for(layout, query)
    np.testing.assert_array_equal(weights, layout.weights(expect))
    np.testing.assert_array_equal(state, layout.state(expect))
    np.testing.assert_array_equal(tier.rows(tier.probe(query)), expect)
    np.testing.assert_array_equal(tier.keys_of(slots), ids)
    assert tier.occupancy() == 4


def test_a_crowded_batch_never_gives_one_slot_to_two_ids_and_returns_dirty_victims(device):
    tier, layout = tier_of(config(device, rows=32))          # one set of 32 ways
    first = np.arange(32, dtype=np.int64)
    insert(tier, layout, first, dirty=True)
    tier.begin_batch()
    new = np.arange(100, 140, dtype=np.int64)                  # 40 new ids for 32 ways
    choice = tier.choose_slots(new)
    taken = choice.slots[choice.slots >= 0]
    assert len(taken) == 32 and len(set(taken.tolist())) == 32
    assert sorted(choice.dirty_ids.tolist()) == sorted(tier.keys_of(taken).tolist())
    np.testing.assert_array_equal(choice.dirty_rows, rows_for(layout, choice.dirty_ids))


def test_locked_slots_are_never_victims(device):
    tier, layout = tier_of(config(device, rows=32))
    held = np.arange(32, dtype=np.int64)
    slots = insert(tier, layout, held)
    tier.lock(slots[:10])
    assert tier.locked_rows() == 10
    tier.begin_batch()
    choice = tier.choose_slots(np.arange(100, 132, dtype=np.int64))
    assert not set(choice.slots.tolist()) & set(slots[:10].tolist())
    tier.unlock(slots[:10])
    assert tier.locked_rows() == 0


def test_an_access_is_recorded_once_per_row_in_its_header(device):
    tier, layout = tier_of(config(device))
    ids = np.array([1, 2, 3], dtype=np.int64)
    slots = insert(tier, layout, ids)
    before_access, before_count = tier.headers(slots)
    tier.begin_batch()
    got = tier.probe_and_touch(np.array([1, 1, 2, 99], dtype=np.int64), NOW)
    np.testing.assert_array_equal(got[:3], slots[[0, 0, 1]])
    assert got[3] == -1
    access, count = tier.headers(slots)
    np.testing.assert_array_equal(count, before_count + np.array([1, 1, 0]))
    np.testing.assert_array_equal(access, [NOW, NOW, before_access[2]])
    tier.access(slots[2:], NOW + 5)
    assert tier.headers(slots[2:])[0].tolist() == [NOW + 5]


def cached_4_5_6(device):
    """A tier holding ids 4, 5, 6: (tier, layout, their slots, their access counts)."""
    tier, layout = tier_of(config(device))
    slots = insert(tier, layout, np.array([4, 5, 6], dtype=np.int64))
    return tier, layout, slots, tier.headers(slots)[1]


def assert_rows_of_4_and_6_looked_up(tier, layout, slots, before_count, query, hit, weights, state):
    """A lookup of ids 4 and 6 (of cached 4, 5, 6; duplicates allowed) gave the hits' stored rows,
    state only when asked for, and counted each id's access once; returns the headers."""
    expect = rows_for(layout, query)
    np.testing.assert_array_equal(weights[hit], layout.weights(expect)[hit])
    if state is not None:
        np.testing.assert_array_equal(state[hit], layout.state(expect)[hit])
    access, count = tier.headers(slots)
    np.testing.assert_array_equal(count, before_count + np.array([1, 0, 1]))   # duplicates once
    assert access[[0, 2]].tolist() == [NOW, NOW]
    return access, count


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("into", [False, True], ids=["new memory", "into out"])
def test_a_lookups_probe_touch_and_gather_in_one_call_equal_the_three_steps(device, with_state, into):
    tier, layout, slots, before_count = cached_4_5_6(device)
    tier.begin_batch()
    query = np.array([6, 99, 4, 6], dtype=np.int64)
    out = np.zeros((len(query), DIM), np.float32) if into else None
    got, weights, state = tier.probe_touch_columns(query, NOW, with_state, out)
    assert (weights is out) == into
    np.testing.assert_array_equal(got, [slots[2], -1, slots[0], slots[2]])
    assert (state is not None) == with_state
    assert_rows_of_4_and_6_looked_up(tier, layout, slots, before_count, query, got >= 0, weights, state)


def stamps(tier) -> tuple[int, list[int]]:
    """The tier's batch tick and every slot's last-use stamp, on the host."""
    cache = getattr(tier, "cache", tier)       # the GPU tier holds a GpuCache; the host tier is its cache
    last_used = cache.last_used
    return cache.tick, np.asarray(last_used.get() if hasattr(last_used, "get") else last_used).tolist()


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("into", [False, True], ids=["new memory", "into out"])
def test_a_lookup_of_cached_ids_records_each_access_once_and_one_miss_changes_nothing(device, with_state, into):
    tier, layout, slots, before_count = cached_4_5_6(device)
    query = np.array([6, 4, 6], dtype=np.int64)
    out = np.zeros((len(query), DIM), np.float32) if into else None
    before = stamps(tier)
    weights, state = tier.cached_columns(query, NOW, with_state, out)
    assert (weights is out) == into and (state is not None) == with_state
    access, count = assert_rows_of_4_and_6_looked_up(tier, layout, slots, before_count, query,
                                                     np.ones(len(query), bool), weights, state)
    tick, last_used = stamps(tier)
    assert tick == before[0] + 1 and [last_used[s] for s in slots] == [tick, before[1][slots[1]], tick]
    for missing in ([5, 99], [99], [4, 4, 6, 6, 5, 123]):         # a miss anywhere in the batch
        out = np.zeros((len(missing), DIM), np.float32) if into else None
        assert tier.cached_columns(np.array(missing, dtype=np.int64), NOW + 9, with_state, out) is None
        assert stamps(tier) == (tick, last_used)                 # the miss touched nothing
        assert tier.headers(slots)[0].tolist() == access.tolist()
        np.testing.assert_array_equal(tier.headers(slots)[1], count)


def test_dirty_bits_follow_set_dirty(device):
    tier, layout = tier_of(config(device))
    slots = insert(tier, layout, np.arange(6, dtype=np.int64), dirty=True)
    assert sorted(tier.dirty_slots().tolist()) == sorted(slots.tolist())
    assert tier.dirty_rows() == 6
    tier.set_dirty(slots[:4], False)
    assert tier.dirty_rows() == 2
    occupied, dirty = tier.flags(slots)
    assert occupied.all() and dirty.tolist() == [False] * 4 + [True] * 2
    assert sorted(tier.clean_slots().tolist()) == sorted(slots[:4].tolist())


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad", "adam", "partial_rowwise_adam"])
def test_staged_rows_step_like_the_reference_and_publish_only_when_asked(device, optimizer):
    cfg = config(device, optimizer=optimizer)
    tier, layout = tier_of(cfg)
    ids = np.array([4, 5, 6], dtype=np.int64)
    slots = insert(tier, layout, ids)
    probe = np.array([slots[0], -1, slots[2]])
    staged = tier.stage(probe)
    fresh = rows_for(layout, np.array([50], dtype=np.int64))
    tier.load(staged, np.array([1]), fresh)
    grads = np.random.default_rng(3).standard_normal((3, DIM)).astype(np.float32)
    bad = tier.step(staged, grads)
    assert not bad.any()
    expect = np.concatenate([rows_for(layout, ids[:1]), fresh, rows_for(layout, ids[2:])])
    step_rows(make_optimizer(cfg.optimizer, DIM), layout, expect, grads)
    got = tier.to_host(staged)
    np.testing.assert_allclose(layout.weights(got), layout.weights(expect), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layout.state(got), layout.state(expect), rtol=1e-5, atol=1e-6)
    assert (layout.header(got)["step"] == 1).all()
    np.testing.assert_array_equal(tier.rows(slots), rows_for(layout, ids))    # nothing published yet
    tier.publish(slots[[0, 2]], tier.select(staged, np.array([0, 2])))
    np.testing.assert_array_equal(tier.rows(slots[[0, 2]]), got[[0, 2]])


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam"])
def test_a_step_of_cached_rows_is_kept_dirty_and_a_miss_or_a_refused_step_changes_nothing(device, optimizer):
    cfg = config(device, optimizer=optimizer)
    tier, layout = tier_of(cfg)
    ids = np.array([4, 5, 6], dtype=np.int64)
    slots = insert(tier, layout, ids)
    grads = np.random.default_rng(4).standard_normal((2, DIM)).astype(np.float32)
    before = stamps(tier), tier.rows(slots).copy(), tier.flags(slots)[1].tolist()
    for missing in ([4, 99], [99, 6]):                       # a miss anywhere: nothing changes
        assert tier.step_cached(np.array(missing, dtype=np.int64), grads, NOW, True) is None
        assert (stamps(tier), tier.rows(slots).tolist(), tier.flags(slots)[1].tolist()) == (
            before[0], before[1].tolist(), before[2])
    huge = np.full((2, DIM), np.inf, np.float32)              # refused: nothing published
    assert tier.step_cached(ids[[0, 2]], huge, NOW, True).all()
    np.testing.assert_array_equal(tier.rows(slots), before[1])
    assert tier.flags(slots)[1].tolist() == before[2]

    assert tier.step_cached(ids[[0, 2]], grads, NOW, True).tolist() == [False, False]
    expect = rows_for(layout, ids[[0, 2]])
    step_rows(make_optimizer(cfg.optimizer, DIM), layout, expect, grads)
    got = tier.rows(slots)
    np.testing.assert_allclose(layout.weights(got[[0, 2]]), layout.weights(expect), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layout.state(got[[0, 2]]), layout.state(expect), rtol=1e-5, atol=1e-6)
    header = layout.header(got)
    assert header["step"].tolist() == [1, 0, 1]
    assert header["last_access"][[0, 2]].tolist() == [NOW, NOW]
    assert (header["count"] - layout.header(before[1])["count"]).tolist() == [1, 0, 1]
    assert tier.flags(slots)[1].tolist() == [True, False, True]
    tick, last_used = stamps(tier)
    assert tick == before[0][0] + 1 and [last_used[s] for s in slots] == [tick, before[0][1][slots[1]], tick]
    allowed = tier.step_cached(ids[[0, 2]], huge, NOW, False)       # a table that allows Inf keeps it
    assert allowed.all() and not np.isfinite(layout.weights(tier.rows(slots[[0, 2]]))).any()


def test_a_step_to_infinity_is_reported_per_row(device):
    tier, layout = tier_of(config(device, optimizer="sgd"))
    staged = tier.stage(insert(tier, layout, np.array([1, 2], dtype=np.int64)))
    grads = np.zeros((2, DIM), dtype=np.float32)
    grads[1, 0] = np.float32(3e38)
    assert tier.step(staged, grads).tolist() == [False, False]
    assert tier.step(staged, np.full((2, DIM), np.inf, np.float32)).all()


def test_staged_columns_scores_and_touch(device):
    tier, layout = tier_of(config(device))
    slots = insert(tier, layout, np.array([1, 2], dtype=np.int64))
    staged = tier.stage(slots)
    weights = np.full((2, DIM), 2.5, dtype=np.float32)
    state = np.full((2, cfg_state_dim()), 0.5, dtype=np.float32)
    tier.set_columns(staged, weights, state)
    tier.set_scores(staged, np.array([7, 9], dtype=np.uint16))
    tier.touch_staged(staged, NOW)
    got = tier.to_host(staged)
    np.testing.assert_array_equal(layout.weights(got), weights)
    np.testing.assert_array_equal(layout.state(got), state)
    assert layout.header(got)["score"].tolist() == [7, 9]
    assert layout.header(got)["last_access"].tolist() == [NOW, NOW]
    assert layout.header(got)["count"].tolist() == [1, 1]


def cfg_state_dim() -> int:
    return config("cpu").state_dim


def test_written_rows_invalidate_and_clear(device):
    tier, layout = tier_of(config(device))
    ids = np.arange(10, dtype=np.int64)
    slots = insert(tier, layout, ids)
    tier.write_rows(slots[:2], rows_for(layout, np.array([90, 91], dtype=np.int64)))
    np.testing.assert_array_equal(tier.rows(slots[:2]), rows_for(layout, np.array([90, 91], dtype=np.int64)))
    tier.invalidate(ids[:5])
    assert (tier.probe(ids[:5]) == -1).all() and (tier.probe(ids[5:]) >= 0).all()
    assert tier.occupancy() == 5
    tier.clear()
    assert tier.occupancy() == 0 and (tier.probe(ids) == -1).all()
