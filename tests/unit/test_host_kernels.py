"""The host cache's compiled loops (`kvstore.host_kernels`) against NumPy references, and the
rows of a cached lookup written into a caller's array (the server's response message)."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from kvstore_proto.tensors import WIRE_DTYPES, encode_lookup_response, lookup_response_into

from kvstore import CacheConfig, OptimizerConfig, row_threads
from kvstore.cache import SetAssociativeCache
from kvstore.eviction.rules import COUNT_WORD, touch_headers
from kvstore.host_kernels import gather_rows, probe_read_hits, probe_slots, read_hits, scatter_rows
from kvstore.rows import MAX_COUNT

from .conftest import table_config


@pytest.fixture(autouse=True, params=[1, 4], ids=["one thread", "four threads"])
def threads(request, monkeypatch):
    """Every test runs with the loops in one thread, and split over four from 8 rows a part."""
    monkeypatch.setattr(row_threads, "THREADS", request.param)
    monkeypatch.setattr(row_threads, "PARALLEL_ROWS", 8)
    return request.param


def _slab(rng, slots: int = 300, row_bytes: int = 48) -> np.ndarray:
    return rng.integers(0, 256, (slots, row_bytes), dtype=np.uint8)


@pytest.mark.parametrize(("offset", "nbytes"), [(0, 48), (16, 32), (8, 4), (47, 1)])
def test_gather_rows_equals_numpy_indexing(offset, nbytes):
    rng = np.random.default_rng(1)
    slab = _slab(rng)
    slots = rng.integers(0, len(slab), 1000)         # repeats, any order, more than the prefetch distance
    out = np.full((len(slots), nbytes), 0xAB, np.uint8)
    gather_rows(slab, slots, offset, nbytes, out)
    np.testing.assert_array_equal(out, slab[slots, offset:offset + nbytes])


def test_gather_rows_leaves_rows_of_negative_slots_and_refuses_slots_past_the_end():
    slab = _slab(np.random.default_rng(2))
    out = np.full((3, 48), 7, np.uint8)
    gather_rows(slab, np.array([4, -1, 9]), out=out)
    np.testing.assert_array_equal(out[[0, 2]], slab[[4, 9]])
    assert (out[1] == 7).all()
    with pytest.raises(IndexError, match="slot 300"):
        gather_rows(slab, np.array([1, 300]))


def test_gather_rows_refuses_an_out_it_cannot_write_in_place():
    slab = _slab(np.random.default_rng(3))
    with pytest.raises(ValueError, match="C-contiguous"):
        gather_rows(slab, np.array([1, 2]), 0, 8, out=np.zeros((2, 16), np.uint8)[:, ::2])
    with pytest.raises(ValueError, match="holds"):
        gather_rows(slab, np.array([1, 2]), 0, 8, out=np.zeros((2, 4), np.uint8))


def test_scatter_rows_equals_a_loop_of_row_writes_the_last_of_a_repeated_slot_winning():
    rng = np.random.default_rng(9)
    slab = _slab(rng)
    slots = np.concatenate([rng.integers(0, len(slab), 400), [7, 7, 8, 7]])
    rows = rng.integers(0, 256, (len(slots), 48), dtype=np.uint8)
    want = slab.copy()
    for slot, row in zip(slots, rows, strict=True):
        want[slot] = row
    scatter_rows(slab, slots, rows)
    np.testing.assert_array_equal(slab, want)


@pytest.mark.parametrize("bad", [300, -1])
def test_scatter_rows_refuses_a_slot_outside_the_slab_before_writing_any_row(bad):
    rng = np.random.default_rng(10)
    slab = _slab(rng)
    before = slab.copy()
    slots = np.append(rng.integers(0, len(slab), 99), bad)
    with pytest.raises(IndexError, match=f"slot {bad} is outside"):
        scatter_rows(slab, slots, np.zeros((100, 48), np.uint8))
    np.testing.assert_array_equal(slab, before)
    with pytest.raises(ValueError, match="rows of shape"):
        scatter_rows(slab, slots[:2], np.zeros((2, 40), np.uint8))


@pytest.mark.parametrize("count_uses", [False, True])
def test_read_hits_records_each_slot_once_and_gathers_like_numpy(count_uses):
    """The fused pass equals stamps (`touch`), header counts (`touch_headers`) and two column
    gathers, duplicates counted once and counts saturating."""
    rng = np.random.default_rng(4)
    slab = _slab(rng, row_bytes=64)
    words = slab.view(np.uint32)
    words[:5, COUNT_WORD] = MAX_COUNT                 # saturated counts stay saturated
    last_used = rng.integers(0, 5, len(slab)).astype(np.int64)
    uses = rng.integers(0, 9, len(slab)).astype(np.int64) if count_uses else None
    slots = np.concatenate([rng.integers(0, len(slab), 500), [0, 1, 1, 2]])
    want_slab, want_last, want_uses = slab.copy(), last_used.copy(), None if uses is None else uses.copy()
    touch_headers(want_slab, slots, 1234)
    want_last[slots] = 9
    if want_uses is not None:
        want_uses[slots] += 1
    weights, state = np.empty((len(slots), 8), np.float32), np.empty((len(slots), 2), np.float32)
    read_hits(slab, COUNT_WORD, MAX_COUNT, 1234, last_used, 9, uses, slots, (16, weights), (48, state))
    np.testing.assert_array_equal(slab, want_slab)
    np.testing.assert_array_equal(last_used, want_last)
    if uses is not None:
        np.testing.assert_array_equal(uses, want_uses)
    np.testing.assert_array_equal(weights.view(np.uint8), want_slab[slots, 16:48])
    np.testing.assert_array_equal(state.view(np.uint8), want_slab[slots, 48:56])


def test_read_hits_skips_uncached_slots_and_refuses_slots_past_the_end():
    rng = np.random.default_rng(5)
    slab = _slab(rng, row_bytes=64)
    before, last_used = slab.copy(), np.zeros(len(slab), np.int64)
    with pytest.raises(IndexError, match="outside a cache of 300"):
        read_hits(slab, COUNT_WORD, MAX_COUNT, 5, last_used, 1, None, np.array([3, len(slab)]),
                  (16, np.empty((2, 4), np.float32)))
    np.testing.assert_array_equal(slab, before)          # nothing recorded before the refusal
    assert not last_used.any()
    weights = np.full((2, 4), 7, np.float32)
    read_hits(slab, COUNT_WORD, MAX_COUNT, 5, last_used, 1, None, np.array([-1, 3]), (16, weights))
    assert (weights[0] == 7).all() and (weights[1].view(np.uint8) == slab[3, 16:32]).all()
    assert list(np.flatnonzero(last_used)) == [3]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_lookup_response_filled_in_place_is_the_encoded_response(dtype):
    rows = np.random.default_rng(6).standard_normal((37, 5)).astype(np.float32)
    rows = rows.astype(WIRE_DTYPES[dtype])
    message, view = lookup_response_into(37, 5, rows.dtype)
    view[...] = rows
    assert message == encode_lookup_response(rows)
    assert lookup_response_into(0, 5, rows.dtype) is None                  # nothing to fill: encode it
    assert lookup_response_into(3, 5, np.dtype(">f4")) is None             # no wire name in that order


def test_a_cached_lookup_writes_its_weights_into_out(store):
    store.create_table(table_config("t", dim=4, optimizer=OptimizerConfig(name="adagrad", lr=0.1)))
    store.apply_gradients("t", [1, 2, 3], np.ones((3, 4), np.float32))
    expected = store.lookup("t", [3, 1, 3], with_state=True)
    out = np.zeros((3, 4), np.float32)
    found = store.lookup_if_cached("t", [3, 1, 3], with_state=True, out=out)
    assert found.weights is out
    np.testing.assert_array_equal(out, expected.weights)
    np.testing.assert_array_equal(found.state, expected.state)


@pytest.mark.parametrize("out", [np.zeros((2, 4), np.float32), np.zeros((3, 5), np.float32),
                                 np.zeros((3, 4), np.float64), np.zeros((3, 8), np.float32)[:, ::2]])
def test_an_out_of_another_shape_dtype_or_layout_gives_none_and_changes_nothing(store, out):
    store.create_table(table_config("t", dim=4))
    store.update("t", [1, 2, 3], np.ones((3, 4), np.float32))
    before = store.stats("t")
    assert store.lookup_if_cached("t", [1, 2, 3], out=out) is None
    assert not out.any() and store.stats("t") == before


def test_a_lookup_with_misses_writes_cached_and_new_rows_into_out(store):
    store.create_table(table_config("t", dim=4, optimizer=OptimizerConfig(name="adagrad", lr=0.1)))
    store.apply_gradients("t", [1, 2, 3], np.ones((3, 4), np.float32))
    ids = [3, 40, 1, 40, 7]                                 # cached, new (twice), cached, new
    out = np.zeros((5, 4), np.float32)
    misses = store.stats("t").get("cache_misses", 0)
    found = store.lookup("t", ids, with_state=True, out=out)
    assert found.weights is out and store.stats("t")["cache_misses"] == misses + 3     # positions
    expected = store.lookup("t", ids, with_state=True)      # the same rows, now all stored
    np.testing.assert_array_equal(out, expected.weights)
    np.testing.assert_array_equal(found.state, expected.state)
    other = np.zeros((5, 4), np.float64)                    # not the table's dtype: not used
    assert store.lookup("t", ids, out=other).weights is not other and not other.any()


def test_a_batch_split_over_threads_refuses_a_bad_slot_before_recording_anything(threads):
    rng = np.random.default_rng(7)
    slab = _slab(rng, row_bytes=64)
    before, last_used = slab.copy(), np.zeros(len(slab), np.int64)
    slots = np.append(rng.integers(0, len(slab), 99), len(slab))
    assert row_threads._parts(len(slots)) == threads
    with pytest.raises(IndexError, match=f"slot {len(slab)} is outside"):
        read_hits(slab, COUNT_WORD, MAX_COUNT, 5, last_used, 1, None, slots, (16, np.empty((100, 4), np.float32)))
    np.testing.assert_array_equal(slab, before)
    assert not last_used.any()
    with pytest.raises(IndexError, match=f"slot {len(slab)} is outside"):
        gather_rows(slab, slots)


def test_the_probe_split_over_threads_finds_what_one_thread_finds(threads):
    """Parts write disjoint hint entries: the slots found, and those found again through the
    hints the first probe wrote, equal the cache's own record of where each id is."""
    cache = SetAssociativeCache(CacheConfig(rows=4096, ways=8), 16)
    rng = np.random.default_rng(8)
    ids = rng.choice(1 << 40, 3000, replace=False).astype(np.int64)
    cache.begin_batch()
    choice = cache.choose_slots(ids)
    cache.fill(choice.slots, ids, np.zeros((len(ids), 16), np.uint8), np.zeros(len(ids), bool))
    placed = dict(zip(cache.keys[cache.occupied].tolist(), np.flatnonzero(cache.occupied).tolist(), strict=True))
    cache.hints[:] = -1                                # every id found through its set, then hinted
    queries = np.concatenate([ids, rng.integers(0, 1 << 40, 500), ids[::-1]])
    want = np.array([placed.get(int(i), -1) for i in queries])
    for _ in range(2):                                 # the second probe reads the hints the first wrote
        got = probe_slots(*cache.probing(), queries)
        np.testing.assert_array_equal(got, want)


def test_the_probe_and_read_in_one_call_equal_the_two_and_a_miss_changes_nothing(threads):
    """`probe_read_hits` (one compiled call unless split): the slots and rows of `probe_slots` then
    `read_hits`, the same accesses recorded; with one id not cached, None, and no stamp, header or
    output byte written."""
    rng = np.random.default_rng(12)
    caches = []
    for _ in range(2):
        cache = SetAssociativeCache(CacheConfig(rows=512, ways=8), 32)
        ids = np.arange(200, dtype=np.int64) * 7919
        cache.begin_batch()
        choice = cache.choose_slots(ids)
        cache.fill(choice.slots, ids, rng.integers(0, 256, (len(ids), 32), dtype=np.uint8), np.zeros(len(ids), bool))
        cache.slab[:] = np.arange(cache.slab.size, dtype=np.uint64).astype(np.uint8).reshape(cache.slab.shape)
        caches.append(cache)
    one, two = caches
    queries = ids[rng.integers(0, len(ids), 64)]
    slots = probe_slots(*two.probing(), queries)
    weights_two = np.zeros((len(queries), 4), np.float32)
    read_hits(two.slab, COUNT_WORD, MAX_COUNT, 9, two.last_used, 5, None, slots, (16, weights_two))
    weights_one = np.zeros((len(queries), 4), np.float32)
    got = probe_read_hits(one.probing(), queries, one.slab, COUNT_WORD, MAX_COUNT, 9, one.last_used, 5, None,
                          (16, weights_one))
    np.testing.assert_array_equal(got, slots)
    np.testing.assert_array_equal(weights_one, weights_two)
    np.testing.assert_array_equal(one.last_used, two.last_used)
    np.testing.assert_array_equal(one.slab, two.slab)                   # the headers' counts and access times
    before = (one.slab.copy(), one.last_used.copy())
    missing = np.concatenate([queries[:20], [5], queries[20:]]).astype(np.int64)      # 5 was never cached
    out = np.full((len(missing), 4), 7, np.float32)
    assert probe_read_hits(one.probing(), missing, one.slab, COUNT_WORD, MAX_COUNT, 10, one.last_used, 6, None,
                           (16, out)) is None
    np.testing.assert_array_equal(one.slab, before[0])
    np.testing.assert_array_equal(one.last_used, before[1])
    assert (out == 7).all()


def test_a_forked_child_splits_a_batch_with_threads_of_its_own(threads):
    """The parent's pool threads do not exist in a forked child: a child that reused the pool
    would wait for them forever (the alarm ends such a child, failing the test)."""
    rng = np.random.default_rng(11)
    slab = _slab(rng)
    slots = rng.integers(0, len(slab), 1000)
    np.testing.assert_array_equal(gather_rows(slab, slots), slab[slots])       # the parent's pool, if split
    child = os.fork()
    if child == 0:                                                               # pragma: no cover - the child
        signal.alarm(60)
        os._exit(0 if np.array_equal(gather_rows(slab, slots), slab[slots]) else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize(("cpu_max", "v1", "expected"), [
    ("150000 100000\n", None, 2),            # a quota of 1.5 CPUs: two threads
    ("max 100000\n", None, None),            # no quota: the affinity mask
    (None, ("100000", "100000"), 1),         # cgroup v1
    (None, ("-1", "100000"), None),
    ("garbled\n", None, None),
    (None, None, None),                      # no cgroup files
])
def test_a_containers_cpu_quota_caps_the_threads(tmp_path, monkeypatch, cpu_max, v1, expected):
    paths = {name: tmp_path / name for name in ("cpu.max", "quota", "period")}
    if cpu_max is not None:
        paths["cpu.max"].write_text(cpu_max)
    if v1 is not None:
        paths["quota"].write_text(v1[0])
        paths["period"].write_text(v1[1])
    monkeypatch.setattr(row_threads, "CGROUP_CPU_MAX", paths["cpu.max"])
    monkeypatch.setattr(row_threads, "CGROUP_V1_QUOTA", paths["quota"])
    monkeypatch.setattr(row_threads, "CGROUP_V1_PERIOD", paths["period"])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert row_threads.usable_cpus() == (expected or 16)
    assert row_threads.default_threads() == min(8, expected or 16)


# --- the initializer's compiled pass --------------------------------------------------------


def _numpy_initial(kind: str, ids: np.ndarray, dim: int, seed: int, scale: float) -> np.ndarray:
    """The initializer's formulas as NumPy wrote them before they were compiled, step by step."""
    golden = np.uint64(0x9E3779B97F4A7C15)

    def splitmix(x):
        z = np.array(x, np.uint64, ndmin=1) + golden
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
        return z

    def uniform01(stream):
        base = splitmix(ids.view(np.uint64) ^ splitmix(np.uint64(seed) + np.uint64(stream))[0])
        counters = splitmix(base[:, None] + np.arange(dim, dtype=np.uint64)[None, :] * golden)
        return ((counters >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))

    with np.errstate(over="ignore"):
        if kind == "uniform":
            return (uniform01(0) * 2.0 - 1.0) * scale
        return np.sqrt(np.log(uniform01(1)) * -2.0) * np.cos(uniform01(2) * (2.0 * np.pi)) * scale


@pytest.mark.parametrize("kind", ["uniform", "normal"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_initial_rows_equal_the_numpy_formulas_in_a_tables_rows(kind, dtype):
    """Written in place into a table's rows (a strided view, header bytes around it), in any
    dtype; uniform rows bit for bit, normal ones to the last bits of log and cos."""
    from kvstore import InitializerConfig
    from kvstore.dtypes import weight_dtype
    from kvstore.initializer import initial_weights, write_initial
    from kvstore.rows import RowLayout

    ids = np.concatenate([np.random.default_rng(5).integers(-2**63, 2**63 - 1, 300), [0, -1, 2**63 - 1]])
    config = InitializerConfig(kind=kind, seed=2**64 - 3, scale=0.25)
    layout = RowLayout(dim=20, dtype=weight_dtype(dtype), state_dim=3)
    rows = layout.empty(len(ids))
    rows[:] = 0xA5                                               # every byte the pass must not touch
    write_initial(config, ids, layout.weights(rows))
    expected = _numpy_initial(kind, ids, 20, config.seed, config.scale)
    assert expected.dtype == np.float64
    if kind == "uniform":
        np.testing.assert_array_equal(initial_weights(config, ids, 20).view(np.uint64), expected.view(np.uint64))
    else:
        np.testing.assert_allclose(initial_weights(config, ids, 20), expected, rtol=1e-12, atol=0)
    written, wanted = layout.weights(rows).astype(np.float64), expected.astype(weight_dtype(dtype)).astype(np.float64)
    if kind == "uniform":
        np.testing.assert_array_equal(written, wanted)
    else:              # a last float64 bit apart may round the other way in a narrower dtype
        np.testing.assert_allclose(written, wanted, rtol={"float64": 1e-12, "float32": 2**-23, "float16": 2**-10,
                                                          "bfloat16": 2**-7}[dtype], atol=0)
    untouched = np.ones(layout.row_bytes, bool)
    untouched[layout.weight_offset:layout.weight_offset + 20 * layout.dtype.itemsize] = False
    assert (rows[:, untouched] == 0xA5).all()


def test_zeros_initializer_and_empty_batches_write_zeros_or_nothing():
    from kvstore import InitializerConfig
    from kvstore.initializer import initial_weights, write_initial

    out = np.full((4, 3), 9.0, np.float32)
    write_initial(InitializerConfig(kind="zeros"), np.arange(4), out)
    assert (out == 0).all()
    assert initial_weights(InitializerConfig(), np.zeros(0, np.int64), 5).shape == (0, 5)
    assert initial_weights(InitializerConfig(), np.arange(3), 0).shape == (3, 0)


def test_warm_runs_every_loop_with_the_arguments_they_take_now(threads):
    """A server warms the loops as it starts and only logs a failure (its first lookup would meet
    it); so a loop whose arguments changed must fail here, not in a log."""
    from kvstore import host_kernels

    host_kernels.warm()


def test_the_loops_prefetch_into_every_cache_level_not_non_temporally():
    """The non-temporal hint (locality 0) made a 4,096-row gather twice as slow on a 2-core VM
    (docs/benchmarks.md, stop 42): every prefetch of the loops asks for locality 3."""
    from numba import njit

    from kvstore.host_loops import _prefetch, _prefetch_write

    @njit
    def both(array):
        _prefetch(array, 1)
        _prefetch_write(array, 2)

    both(np.zeros(4, np.int64))
    calls = [line for text in both.inspect_llvm().values() for line in text.splitlines()
             if "call" in line and "llvm.prefetch" in line]
    assert len(calls) == 2
    assert all(line.rstrip().endswith("i32 3, i32 1)") for line in calls), calls
    assert sum("i32 1, i32 3, i32 1)" in line for line in calls) == 1          # one of them for writing
