"""The GPU cache gives the host cache's hits, misses, victims and rows, batch after batch."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from kvstore import CacheConfig
from kvstore.cache import SetAssociativeCache

from .conftest import require_gpu

cupy = require_gpu()
from kvstore.gpu_cache import GpuCache  # noqa: E402  (needs CuPy)

ROW_BYTES = 48


def pair(rows: int, ways: int, policy: str, spills: bool = True) -> tuple[SetAssociativeCache, GpuCache]:
    """The host design as the GPU cache's reference. `spills` False: the reference of
    `find_or_insert`, which claims its slots in the victim kernel and does not spill."""
    config = CacheConfig(rows=rows, ways=ways, policy=policy)
    host = SetAssociativeCache(config, ROW_BYTES)
    host.spills = spills
    return host, GpuCache(config, ROW_BYTES)


def rows_for(ids: np.ndarray) -> np.ndarray:
    """A recognizable row per id."""
    return ((ids[:, None] * 31 + np.arange(ROW_BYTES)[None, :]) % 251).astype(np.uint8)


def stored_rows(gpu: GpuCache) -> np.ndarray:
    """Every slot's row in the stored layout (the slab holds them rotated)."""
    return gpu.gather_rows(cupy.arange(gpu.capacity)).get()


def assert_same_state(host: SetAssociativeCache, gpu: GpuCache) -> None:
    occupied = gpu.occupied.get()
    np.testing.assert_array_equal(occupied, host.occupied)
    for name in ("keys", "last_used") + (("uses",) if host.uses is not None else ()):   # LRU counts no uses
        np.testing.assert_array_equal(getattr(gpu, name).get()[occupied], getattr(host, name)[occupied], err_msg=name)
    np.testing.assert_array_equal(gpu.dirty.get()[occupied], host.dirty[occupied])
    np.testing.assert_array_equal(stored_rows(gpu)[occupied], host.slab[occupied])
    np.testing.assert_array_equal(gpu.spilled.get(), host.spilled)


def draw(rng, kind: str, n: int, universe: int) -> np.ndarray:
    if kind == "zipf":
        return (rng.zipf(1.2, n) % universe).astype(np.int64) * 7919 - universe
    return rng.integers(-universe, universe, n, dtype=np.int64)


@pytest.mark.parametrize("sets", [4096, 3000])        # a power of two (mask) and not (division)
def test_kernel_set_function_is_the_host_one(sets):
    host, gpu = pair(rows=sets * 32, ways=32, policy="lru")
    ids = np.random.default_rng(0).integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 100_000, dtype=np.int64)
    ids[:4] = [0, -1, np.iinfo(np.int64).min, np.iinfo(np.int64).max]
    np.testing.assert_array_equal(gpu.set_of(ids).get(), host.set_of(ids))


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("ways", [4, 32])
@pytest.mark.parametrize("kind", ["uniform", "zipf"])
def test_batches_give_the_host_hits_victims_and_rows(policy, ways, kind):
    rng = np.random.default_rng(zlib.crc32(f"{policy}-{ways}-{kind}".encode()))
    host, gpu = pair(rows=(64 if kind == "zipf" else 60) * ways, ways=ways, policy=policy)
    for batch in range(40):
        ids = draw(rng, kind, int(rng.integers(1, 3000)), universe=20 * 64 * ways)
        if batch % 5 == 4:   # lock a few occupied slots in both caches
            locked = rng.choice(host.capacity, 16, replace=False)
            host.locks[:] = 0
            host.locks[locked] = 1
            gpu.locks[:] = 0
            gpu.locks[cupy.asarray(locked)] = 1
        host.begin_batch()
        gpu.begin_batch()
        slots = host.probe(ids)
        host.touch(slots[slots >= 0])
        gpu_slots = gpu.probe_and_touch(ids).get()
        np.testing.assert_array_equal(gpu_slots, slots)
        new = np.unique(ids[slots < 0])
        rng.shuffle(new)
        clean = batch % 2 == 1               # the displaced clean rows too (a table with a tier below)
        want = host.choose_slots(new, clean)
        got = gpu.choose_slots(new, clean)
        np.testing.assert_array_equal(got.slots.get(), want.slots)
        np.testing.assert_array_equal(got.dirty_ids.get(), want.dirty_ids)
        np.testing.assert_array_equal(got.dirty_rows.get(), want.dirty_rows)
        if clean:
            np.testing.assert_array_equal(got.clean_ids.get(), want.clean_ids)
            np.testing.assert_array_equal(got.clean_rows.get(), want.clean_rows)
        dirty = rng.random(len(new)) < 0.5
        host.fill(want.slots, new, rows_for(new), dirty)
        gpu.fill(got.slots, new, rows_for(new), dirty)
        assert_same_state(host, gpu)


def test_many_new_ids_in_one_set_never_share_a_slot():
    host, gpu = pair(rows=16 * 32, ways=32, policy="lru")
    candidates = np.arange(200_000, dtype=np.int64)
    one_set = candidates[host.set_of(candidates) == 3][:500]
    for cache in (host, gpu):
        cache.begin_batch()
    host.locks[3 * 32 + 5] = 1
    gpu.locks[3 * 32 + 5] = 1
    want = host.choose_slots(one_set)
    got = gpu.choose_slots(one_set).slots.get()
    np.testing.assert_array_equal(got, want.slots)
    taken = got[got >= 0]
    assert len(np.unique(taken)) == len(taken) == 31 + 32 and 3 * 32 + 5 not in taken   # set 3, then set 4
    assert (taken // 32 == 3).sum() == 31


def test_a_gpu_cache_at_half_load_holds_every_row_and_every_probe_finds_the_spilled_ones():
    cache = GpuCache(CacheConfig(rows=1 << 18, ways=32), ROW_BYTES)
    ids = np.random.default_rng(3).choice(1 << 40, 1 << 17, replace=False).astype(np.int64)
    assert np.bincount(cache.set_of(cupy.asarray(ids)).get()).max() > 32    # some set overflows
    for lo in range(0, len(ids), 1 << 14):
        batch = ids[lo:lo + (1 << 14)]
        cache.begin_batch()
        choice = cache.choose_slots(batch)
        assert (choice.slots >= 0).all()
        cache.fill(choice.slots, batch, cupy.asarray(rows_for(batch)), False)
    assert bool(cache.spilled.any())
    slots = cache.probe(ids).get()
    np.testing.assert_array_equal(cache.keys.get()[slots], ids)
    cache.begin_batch()
    np.testing.assert_array_equal(cache.probe_and_touch(ids).get(), slots)
    cache.begin_batch()
    claim = cache.find_or_insert(ids)
    assert bool(claim.hit.all())                                              # none inserted twice
    np.testing.assert_array_equal(claim.slots.get(), slots)


def test_find_or_insert_is_probe_touch_choose_and_fill():
    rng = np.random.default_rng(5)
    host, gpu = pair(rows=256 * 32, ways=32, policy="lfu", spills=False)
    for _ in range(12):
        ids = np.unique(draw(rng, "zipf", 6000, universe=40_000))
        rng.shuffle(ids)
        host.begin_batch()
        gpu.begin_batch()
        slots = host.probe(ids)
        host.touch(slots[slots >= 0])
        new = ids[slots < 0]
        want = host.choose_slots(new)
        host.fill(want.slots, new, rows_for(new), True)
        claim = gpu.find_or_insert(ids, dirty=True)
        dirty_ids, dirty_rows = gpu.displaced_rows(claim)
        np.testing.assert_array_equal(dirty_ids.get(), want.dirty_ids)
        np.testing.assert_array_equal(dirty_rows.get(), want.dirty_rows)
        np.testing.assert_array_equal(claim.hit.get(), slots >= 0)
        got = claim.slots.get()
        np.testing.assert_array_equal(got[slots >= 0], slots[slots >= 0])
        np.testing.assert_array_equal(got[slots < 0], want.slots)
        gpu.scatter_rows(claim.slots[cupy.asarray(slots < 0)], cupy.asarray(rows_for(new)))
        assert_same_state(host, gpu)


@pytest.mark.parametrize(("offset", "nbytes"), [(16, 512), (16, 12), (16, 6), (0, 48), (20, 28), (0, 16), (4, 8),
                                               (8, 32)])
def test_gather_writes_every_requested_row_and_scatter_puts_it_back(offset, nbytes):
    """Offsets are into the stored row, whatever its place in the slab: header bytes, weights,
    and ranges that start in the header and go on."""
    rows = 1000
    row_bytes = 528 if nbytes == 512 else 48
    gpu = GpuCache(CacheConfig(rows=rows, ways=4), row_bytes)
    stored = cupy.random.randint(0, 255, (rows, row_bytes), dtype=cupy.uint8)
    gpu.scatter_rows(cupy.arange(rows), stored)
    np.testing.assert_array_equal(stored_rows(gpu), stored.get())
    slots = np.random.default_rng(1).integers(-1, rows, 5000)
    out = cupy.full((len(slots), nbytes), 0xAB, dtype=cupy.uint8)   # poison
    gpu.gather(slots, offset, nbytes, out)
    got, want = out.get(), stored.get()
    np.testing.assert_array_equal(got[slots >= 0], want[slots[slots >= 0], offset:offset + nbytes])
    assert (got[slots < 0] == 0xAB).all()
    fresh = cupy.random.randint(0, 255, (rows, nbytes), dtype=cupy.uint8)
    order = cupy.asarray(np.random.default_rng(2).permutation(rows))
    gpu.scatter(order, fresh[order], offset, nbytes)
    want[:, offset:offset + nbytes] = fresh.get()
    np.testing.assert_array_equal(stored_rows(gpu), want)          # only those bytes changed


@pytest.mark.parametrize(("row_bytes", "pitch"), [(544, 576), (528, 544), (48, 48), (1056, 1088), (16, 16)])
def test_slab_rows_lead_with_their_weights_padded_by_at_most_a_sixteenth(row_bytes, pitch):
    """A dim-128 rowwise-Adagrad row (544 bytes) lies 576 bytes apart, its weights first and
    64-byte aligned, its header last; no row is padded by more than 1/16."""
    gpu = GpuCache(CacheConfig(rows=256, ways=32), row_bytes)
    assert gpu.slab.shape == (256, row_bytes) and gpu.slab.strides == (pitch, 1)
    assert gpu.slab.data.ptr % min(64, pitch & -pitch) == 0 and pitch - row_bytes <= row_bytes / 16
    stored = cupy.random.randint(0, 255, (256, row_bytes), dtype=cupy.uint8)
    gpu.scatter_rows(cupy.asarray(np.random.default_rng(5).permutation(256)), stored)
    rows = gpu.slab.get()
    order = np.random.default_rng(5).permutation(256)
    want = stored.get()[np.argsort(order)]
    np.testing.assert_array_equal(rows[:, :row_bytes - 16], want[:, 16:])       # weights and state first
    np.testing.assert_array_equal(rows[:, row_bytes - 16:], want[:, :16])       # then the header


def test_gather_of_float_weights_writes_every_element():
    dim, n = 128, 4096
    gpu = GpuCache(CacheConfig(rows=8192, ways=32), 16 + dim * 4)
    weights = cupy.random.standard_normal((8192, dim), dtype=cupy.float32)
    gpu.scatter(cupy.arange(8192), weights.view(cupy.uint8), 16, dim * 4)
    slots = cupy.asarray(np.random.default_rng(3).permutation(8192)[:n])
    out = cupy.full((n, dim), cupy.nan, dtype=cupy.float32)
    gpu.gather(slots, 16, dim * 4, out.view(cupy.uint8))
    assert not cupy.isnan(out).any()
    np.testing.assert_array_equal(out.get(), weights[slots].get())


def test_summed_gradients_come_in_set_order():
    """Device-summed gradients come in the cache's set order, so a step walks the slab forward."""
    from kvstore.gpu_cache import sum_duplicates

    rng = np.random.default_rng(8)
    gpu = GpuCache(CacheConfig(rows=96 * 32, ways=32), 16)
    ids = rng.integers(-(2**40), 2**40, 300)
    ids = np.concatenate([ids, ids[:120]])                  # duplicates
    grads = rng.standard_normal((len(ids), 3)).astype(np.float32)
    uniq, summed, inverse = sum_duplicates(gpu, cupy.asarray(ids), cupy.asarray(grads))
    uniq, summed, inverse = uniq.get(), summed.get(), inverse.get()
    assert sorted(uniq.tolist()) == sorted(set(ids.tolist()))
    np.testing.assert_array_equal(uniq[inverse], ids)
    want = np.zeros_like(summed)
    np.add.at(want, inverse, grads)
    np.testing.assert_allclose(summed, want, rtol=1e-6)
    assert (np.diff(gpu.set_of(uniq).get()) >= 0).all()


def test_choosing_slots_for_batches_of_any_size_compiles_no_new_kernel(compiles):
    """Kernels compiled per batch size would stall a fresh server for seconds each (NVRTC)."""
    numbers = cupy.arange(4)
    token = np.random.default_rng().integers(1 << 40)
    probe = cupy.ElementwiseKernel("T x", "T y", f"y = x + {token}", f"compile_probe_{token}")
    probe(numbers)
    assert len(compiles) == 1, compiles      # the count sees CuPy's compiles (a new kernel here)
    cache = GpuCache(CacheConfig(rows=64 * 32, ways=32), ROW_BYTES)
    rng = np.random.default_rng(9)
    cache.keys[:] = cupy.arange(cache.capacity)
    cache.occupied[:] = True                  # every way taken (set here: filling would run the path)
    cache.locks[:32] = 1                      # set 0 locked: its new ids want the next set
    cache.occupied[40] = False               # a free way there: the spill check runs to the end
    for n in (5, 9000):                       # each kernel of the path compiled once (a scan of
        cache.begin_batch()                   # more than 256 elements uses one more kernel)
        cache.choose_slots(np.unique(rng.integers(1 << 41, 1 << 42, n, dtype=np.int64)))
    compiles.clear()
    for n in (1, 3, 40, 300, 2000, 40_000):
        new = rng.integers(1 << 41, 1 << 42, n, dtype=np.int64)
        cache.begin_batch()
        assert len(cache.choose_slots(np.unique(new)).slots) == len(np.unique(new))
    assert compiles == [], "\n\n".join(compiles)
