"""The set-associative cache tier: hits, victim order, set conflicts, locks, write-back."""
from __future__ import annotations

import numpy as np
import pytest

from kvstore import CacheConfig, Store
from kvstore.cache import SetAssociativeCache
from kvstore.errors import InvalidArgument
from kvstore.initializer import initial_weights

from .conftest import ids_in_one_set, stored_weights, table_config

ROW_BYTES = 16


def make_cache(rows: int = 4, ways: int = 4, policy: str = "lru") -> SetAssociativeCache:
    """One set by default: victim order within a set, with no next set for rows to spill into."""
    return SetAssociativeCache(CacheConfig(rows=rows, ways=ways, policy=policy), ROW_BYTES)


def rows_for(ids: np.ndarray) -> np.ndarray:
    """A recognizable row per id: every byte is the id's low byte."""
    return np.repeat((ids % 251).astype(np.uint8)[:, None], ROW_BYTES, axis=1)


def insert(cache: SetAssociativeCache, ids, dirty: bool = False) -> np.ndarray:
    """One batch that inserts `ids` (unique, uncached); returns their slots."""
    ids = np.asarray(ids, dtype=np.int64)
    cache.begin_batch()
    choice = cache.choose_slots(ids)
    cache.fill(choice.slots, ids, rows_for(ids), np.full(len(ids), dirty))
    return choice.slots


def use(cache: SetAssociativeCache, ids) -> None:
    """One batch that reads `ids` (all cached)."""
    cache.begin_batch()
    slots = cache.probe(np.asarray(ids, dtype=np.int64))
    assert (slots >= 0).all()
    cache.touch(slots)


def cached(cache: SetAssociativeCache, ids) -> np.ndarray:
    return cache.probe(np.asarray(ids, dtype=np.int64)) >= 0


# --- hits and misses -----------------------------------------------------------


def test_probe_finds_inserted_ids_with_their_rows_and_misses_others():
    cache = make_cache(rows=64, ways=4)
    ids = np.array([3, -7, 1 << 40, 0], dtype=np.int64)
    insert(cache, ids)
    slots = cache.probe(ids)
    assert (slots >= 0).all() and len(set(slots.tolist())) == len(ids)
    np.testing.assert_array_equal(cache.slab[slots], rows_for(ids))
    np.testing.assert_array_equal(cache.probe(np.array([4, 7, -3], dtype=np.int64)), [-1, -1, -1])


@pytest.mark.parametrize("stride", [1, 1024, -7])
def test_sequential_and_strided_ids_spread_over_all_sets(stride):
    cache = make_cache(rows=1 << 20, ways=32)               # 32768 sets
    ids = np.arange(1 << 18, dtype=np.int64) * stride      # a quarter of the capacity
    load = np.bincount(cache.set_of(ids), minlength=cache.num_sets)
    assert (load == 0).sum() < 100 and load.max() < cache.ways   # random: ~11 empty sets, max ~22
    for lo in range(0, len(ids), 1 << 16):
        insert(cache, ids[lo:lo + (1 << 16)])
    assert cache.occupancy() == len(ids)


def test_probe_of_empty_batch_is_empty():
    assert len(make_cache().probe(np.zeros(0, dtype=np.int64))) == 0


# --- victim order ------------------------------------------------------------------


def test_lru_least_recently_used_leave_first():
    cache = make_cache(policy="lru")
    a, b, c, d, e, f = ids_in_one_set(cache, 6)
    for key in (a, b, c, d):            # one batch each: a oldest, d newest
        insert(cache, [key])
    use(cache, [a])
    use(cache, [c])                     # recency now: b < d < a < c
    insert(cache, [e, f])               # two victims: b and d
    np.testing.assert_array_equal(cached(cache, [a, b, c, d, e, f]), [True, False, True, False, True, True])
    insert(cache, ids_in_one_set(cache, 1, start=int(f) + 1))   # next victim: a
    np.testing.assert_array_equal(cached(cache, [a, c, e, f]), [False, True, True, True])


def test_lfu_least_frequently_used_leave_first():
    cache = make_cache(policy="lfu")
    a, b, c, d, e, f = ids_in_one_set(cache, 6)
    insert(cache, [a, b, c, d])
    use(cache, [c, c, c])                    # duplicates within one batch count once: c=2
    for batch in ([a], [a, b], [a, b, d]):   # a=4, b=3, d=2
        use(cache, batch)
    insert(cache, [e])                       # c and d tie on count; c was used longer ago -> c leaves
    np.testing.assert_array_equal(cached(cache, [a, b, c, d, e]), [True, True, False, True, True])
    use(cache, [e, e])                       # e=2 (newer than d)
    insert(cache, [f])                       # d=2 is the least used and oldest of the ties
    np.testing.assert_array_equal(cached(cache, [a, b, d, e, f]), [True, True, False, True, True])


def test_only_lfu_keeps_a_use_count_per_slot():
    """LRU reads only the age stamp, so its caches spend no 8 bytes a slot on use counts."""
    assert make_cache(policy="lru").uses is None
    lfu = make_cache(policy="lfu")
    assert lfu.uses is not None and lfu.uses.shape == (lfu.capacity,)


# --- many misses to one set ----------------------------------------------------------


def test_misses_to_one_set_in_one_batch_never_share_a_slot():
    cache = make_cache()
    ids = ids_in_one_set(cache, 10)
    cache.begin_batch()
    slots = cache.choose_slots(ids).slots
    taken = slots[slots >= 0]
    assert len(taken) == cache.ways
    assert len(np.unique(taken)) == len(taken)
    assert (taken // cache.ways == 0).all()            # all in the ids' own set
    np.testing.assert_array_equal(slots[cache.ways:], -1)


@pytest.mark.parametrize("new_ids", [1, 4])
def test_ways_used_by_the_current_batch_are_not_victims(new_ids):
    cache = make_cache()
    old = ids_in_one_set(cache, 4)
    insert(cache, old[3:])                            # old[3] is the least recently used
    insert(cache, old[:3])
    new = ids_in_one_set(cache, new_ids, start=int(old[-1]) + 1)
    cache.begin_batch()
    cache.touch(cache.probe(old[3:]))                 # this batch reads the oldest one
    slots = cache.choose_slots(new).slots
    assert (slots >= 0).sum() == min(new_ids, 3)
    assert cache.probe(old[3:])[0] not in slots


def reference_slots(cache: SetAssociativeCache, ids: np.ndarray) -> np.ndarray:
    """choose_slots spelled out set by set: empty ways first, then the policy's order
    (ties by way), never locked ways or ways the batch used; ids take ways in batch order.
    Then, in batch order, an id left with no way or an occupied one takes the first free way
    (empty, unlocked, not given) of the next set, if it has one."""
    slots = np.full(len(ids), -1)
    sets = cache.set_of(ids)
    for s in np.unique(sets):
        ways = np.arange(s * cache.ways, (s + 1) * cache.ways)
        blocked = (cache.locks[ways] > 0) | (cache.occupied[ways] & (cache.last_used[ways] == cache.tick))
        if cache.order.__class__.__name__ == "LFU":
            age = np.minimum(cache.uses[ways], (1 << 30) - 1) * 2**32 + (cache.last_used[ways] & 0xFFFFFFFF)
        else:
            age = cache.last_used[ways]
        rank = sorted(range(cache.ways), key=lambda w: (blocked[w], cache.occupied[ways[w]], age[w], w))
        free = [ways[w] for w in rank if not blocked[w]]
        for i, at in enumerate(np.flatnonzero(sets == s)):
            slots[at] = free[i] if i < len(free) else -1
    given = set(slots[slots >= 0].tolist())
    for i in range(len(ids)):
        if slots[i] >= 0 and not cache.occupied[slots[i]]:
            continue
        near = (sets[i] + 1) % cache.num_sets
        for slot in range(near * cache.ways, (near + 1) * cache.ways):
            if not cache.occupied[slot] and not cache.locks[slot] and slot not in given:
                given.add(slot)
                slots[i] = slot
                break
    return slots


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_victims_match_a_set_by_set_reference_in_mixed_batches(policy):
    cache = make_cache(rows=64, ways=4, policy=policy)          # 16 sets: crowded and single sets mix
    rng = np.random.default_rng(7)
    spilled_batches = 0
    for _ in range(30):
        cache.begin_batch()
        batch = np.unique(rng.integers(0, 200, 24))
        cache.touch(cache.probe(batch)[cache.probe(batch) >= 0])
        new = batch[cache.probe(batch) < 0]
        cache.locks[:] = rng.random(cache.capacity) < 0.1
        expected = reference_slots(cache, new)
        choice = cache.choose_slots(new)
        np.testing.assert_array_equal(choice.slots, expected)
        placed = choice.slots >= 0
        spilled_batches += bool((choice.slots[placed] // cache.ways != cache.set_of(new)[placed]).any())
        cache.locks[:] = 0
        cache.fill(choice.slots, new, rows_for(new), np.zeros(len(new), bool))
    assert spilled_batches >= 3 and cache.occupancy() == cache.capacity   # both kinds of choice were checked


def test_table_stays_correct_when_a_batch_overflows_one_set(data_dir):
    with Store(data_dir) as store:
        store.create_table(table_config(rows=8, ways=4))
        cache = store.table("t").cache
        ids = ids_in_one_set(cache, 10)
        config = store.describe_table("t")
        expected = initial_weights(config.initializer, ids, config.dim).astype(np.float32)
        np.testing.assert_array_equal(store.lookup("t", ids).weights, expected)
        np.testing.assert_array_equal(store.lookup("t", ids[::-1]).weights, expected[::-1])
        updated = np.arange(10 * 8, dtype=np.float32).reshape(10, 8)
        store.update("t", ids[::-1], updated[::-1])   # every update id in one set again
        np.testing.assert_array_equal(store.lookup("t", ids).weights, updated)
        assert cache.occupancy() == cache.capacity    # four in their set, four spilled into the next
    with Store(data_dir) as store:                    # every row reached RocksDB
        np.testing.assert_array_equal(store.lookup("t", ids, on_miss="error").weights, updated)


# --- a full set spills into the next ------------------------------------------------


def test_a_full_set_spills_into_the_next_sets_free_ways_instead_of_evicting():
    cache = make_cache(rows=8, ways=4)                 # two sets
    ids = ids_in_one_set(cache, 6)
    slots = insert(cache, ids[:4])
    assert (slots // cache.ways == 0).all()
    slots = insert(cache, ids[4:])                    # set 0 is full: set 1's free ways, nothing evicted
    assert (slots // cache.ways == 1).all()
    assert cached(cache, ids).all()
    cache.hints[:] = -1                               # found through the sets alone
    slots = cache.probe(ids)
    np.testing.assert_array_equal(cache.slab[slots], rows_for(ids))
    assert cache.spilled.tolist() == [True, False]
    others = ids_in_one_set(cache, 3, which=1)        # set 1's own ids take its last free ways, then evict
    insert(cache, others[:2])
    assert cached(cache, ids).all() and cached(cache, others[:2]).all()
    insert(cache, others[2:])                         # both full: the least recently used of set 1 leaves
    np.testing.assert_array_equal(cached(cache, [*ids, *others]), [True] * 4 + [False, True] + [True] * 3)


def test_a_victim_is_taken_from_the_home_set_only_when_the_next_is_full_too():
    cache = make_cache(rows=8, ways=4)
    ids = ids_in_one_set(cache, 9)
    insert(cache, ids[:8])                            # four at home, four spilled
    assert cache.occupancy() == 8
    use(cache, ids[:1])                               # ids[1] is now the home set's oldest
    insert(cache, ids[8:])
    np.testing.assert_array_equal(cached(cache, ids), [True, False] + [True] * 7)
    cache.invalidate(ids[4:5])                        # a spilled row leaves: its way is free again
    slots = insert(cache, ids[1:2])
    assert slots[0] // cache.ways == 1 and cached(cache, ids[1:2]).all()


def test_a_cache_at_half_load_holds_every_row():
    """Random sets: at load 0.5 a few sets of 32 ways get more rows than ways (262,144 rows in
    2^19 slots: about 18). They spill into the next set, so every row is cached."""
    cache = SetAssociativeCache(CacheConfig(rows=1 << 19, ways=32), 16)
    ids = np.random.default_rng(3).choice(1 << 40, 1 << 18, replace=False).astype(np.int64)
    load = np.bincount(cache.set_of(ids), minlength=cache.num_sets)
    assert load.max() > cache.ways                    # the case the spill exists for
    for lo in range(0, len(ids), 1 << 15):
        slots = insert(cache, ids[lo:lo + (1 << 15)])
        assert (slots >= 0).all()
    assert cache.occupancy() == len(ids) and cached(cache, ids).all()
    cache.hints[:] = -1
    slots = cache.probe(ids)
    np.testing.assert_array_equal(cache.keys[slots], ids)


# --- locks ---------------------------------------------------------------------------


def test_locked_slots_are_never_victims():
    cache = make_cache()
    a, b, c, d, *new = ids_in_one_set(cache, 8)
    for key in (a, b, c, d):
        insert(cache, [key])
    cache.locks[cache.probe(np.array([a, b]))] = 1    # the two oldest are locked
    insert(cache, new[:1])                            # one new id: the oldest unlocked way, c
    np.testing.assert_array_equal(cached(cache, [a, b, c, d]), [True, True, False, True])
    slots = insert(cache, new[1:])                    # three more: two unlocked ways for them
    assert (slots >= 0).sum() == 2
    np.testing.assert_array_equal(cached(cache, [a, b, c, d, new[0]]), [True, True, False, False, False])
    slots = insert(cache, ids_in_one_set(cache, 4, start=int(new[-1]) + 1))
    assert (slots >= 0).sum() == 2                    # still only the two unlocked ways
    assert cached(cache, [a, b]).all()


# --- write-back ------------------------------------------------------------------------


def test_eviction_reports_dirty_victims_only():
    cache = make_cache()
    clean, dirty = ids_in_one_set(cache, 2)
    insert(cache, [clean])
    insert(cache, [dirty], dirty=True)
    choice = (cache.begin_batch(), cache.choose_slots(ids_in_one_set(cache, 4, start=int(dirty) + 1)))[1]
    np.testing.assert_array_equal(choice.dirty_ids, [dirty])
    np.testing.assert_array_equal(choice.dirty_rows, rows_for(np.array([dirty])))


def test_dirty_row_evicted_from_tiny_cache_is_in_rocksdb(store):
    store.create_table(table_config(rows=4, ways=4))
    ids = np.arange(4)
    weights = np.arange(32, dtype=np.float32).reshape(4, 8) + 0.5
    store.update("t", ids, weights)
    assert stored_weights(store, "t", ids) == [None] * 4      # write-back: only dirty in the cache
    store.lookup("t", np.arange(100, 104))                    # evicts all four
    on_disk = stored_weights(store, "t", ids)
    np.testing.assert_array_equal(np.stack(on_disk), weights)
    np.testing.assert_array_equal(store.lookup("t", ids, on_miss="error").weights, weights)


@pytest.mark.parametrize("how", ["flush", "close"])
def test_dirty_rows_reach_rocksdb_on_flush_and_close(data_dir, how):
    weights = np.full((3, 8), 2.25, dtype=np.float32)
    store = Store(data_dir)
    store.create_table(table_config())
    store.update("t", [1, 2, 3], weights)
    if how == "flush":
        assert store.flush() == 3
        np.testing.assert_array_equal(np.stack(stored_weights(store, "t", [1, 2, 3])), weights)
    store.close()
    with Store(data_dir) as reopened:
        np.testing.assert_array_equal(reopened.lookup("t", [1, 2, 3], on_miss="error").weights, weights)


def test_invalidate_drops_ids_without_writing_them_back():
    cache = make_cache(rows=64, ways=4)
    insert(cache, [1, 2, 3], dirty=True)
    cache.invalidate(np.array([2, 99], dtype=np.int64))
    np.testing.assert_array_equal(cached(cache, [1, 2, 3]), [True, False, True])
    np.testing.assert_array_equal(np.sort(cache.keys[cache.dirty_slots()]), [1, 3])


# --- probe index: hints, set order ---------------------------------------------------


def test_probe_agrees_with_a_reference_through_evictions_and_invalidations():
    """Hints are guesses: ids that share a hint entry, evicted ids and invalidated ids
    must still probe exactly as a dict of what the cache holds says."""
    rng = np.random.default_rng(5)
    cache = make_cache(rows=256, ways=8)
    for _ in range(30):
        ids = np.unique(rng.integers(-5000, 5000, 120))
        cache.begin_batch()
        fresh = ids[cache.probe(ids) < 0]
        choice = cache.choose_slots(fresh)
        cache.fill(choice.slots, fresh, rows_for(fresh), np.zeros(len(fresh), bool))
        cache.invalidate(rng.choice(ids, 10))
        truth = {int(k): slot for slot, k in enumerate(cache.keys) if cache.occupied[slot]}
        queries = np.concatenate([ids, rng.integers(-5000, 5000, 200)])
        want = [truth.get(int(q), -1) for q in queries]
        np.testing.assert_array_equal(cache.probe(queries), want)
        pairs = cache.hints.reshape(-1, 2)
        live = pairs[pairs[:, 1] >= 0]                  # every live hint is exact, and one a key at most
        assert (cache.keys[live[:, 1]] == live[:, 0]).all() and cache.occupied[live[:, 1]].all()
        assert len(np.unique(live[:, 0])) == len(live)
    assert len(truth) > len(cache.hints)            # more ids than buckets: buckets were shared


def test_ids_sorted_by_their_mix_visit_sets_in_order_and_the_mix_inverts():
    cache = make_cache(rows=3 * 7 * 32, ways=32)    # a set count that is no power of two
    ids = np.random.default_rng(2).integers(-(2**62), 2**62, 5000)
    mixed = cache.mix(ids)
    np.testing.assert_array_equal(cache.unmix(mixed), ids)
    sets = cache.set_of(ids[np.argsort(mixed)])
    assert (np.diff(sets) >= 0).all() and sets.min() == 0 and sets.max() == cache.num_sets - 1


def test_more_than_2_to_the_32_sets_is_refused():
    with pytest.raises(InvalidArgument, match=r"2\*\*32 sets"):
        CacheConfig(rows=1 << 34, ways=2)
