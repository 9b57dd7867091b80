"""A large host cache's memory is paged in ahead of its first writes, and never changed by it."""
from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from kvstore import Store, prefault

from .conftest import table_config

MIB = 1 << 20


def resident_fraction(array: np.ndarray) -> float:
    """The share of `array`'s pages in memory (mincore)."""
    start = array.ctypes.data & ~(prefault.PAGE - 1)
    pages = -(-(array.ctypes.data + array.nbytes - start) // prefault.PAGE)
    flags = (ctypes.c_ubyte * pages)()
    mincore = ctypes.CDLL(None, use_errno=True).mincore
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert mincore(start, pages * prefault.PAGE, flags) == 0, ctypes.get_errno()
    return float((np.frombuffer(flags, np.uint8) & 1).mean())


def supported() -> bool:
    return prefault.populate(np.zeros(prefault.PAGE, np.uint8))


needs_populate = pytest.mark.skipif(not supported(), reason="no MADV_POPULATE_WRITE here (Linux 5.14 or later)")


@needs_populate
def test_populate_makes_an_untouched_array_resident_and_keeps_what_it_holds():
    array = np.zeros(64 * MIB, np.uint8)
    array[::7 * MIB] = 7                       # a few pages written before
    assert prefault.populate(array)
    assert resident_fraction(array) == 1.0
    expected = np.zeros(64 * MIB, np.uint8)
    expected[::7 * MIB] = 7
    np.testing.assert_array_equal(array, expected)


@needs_populate
def test_writes_made_while_a_thread_pages_the_array_in_are_kept(monkeypatch):
    monkeypatch.setattr(prefault, "BACKGROUND_BYTES", MIB)
    array = np.zeros((64 * MIB) // 8, np.int64)
    positions = np.random.default_rng(0).permutation(len(array))[:20_000]
    started = threading.Event()
    original = prefault.populate

    def populate_when_writes_start(target):
        started.wait()
        return original(target)

    monkeypatch.setattr(prefault, "populate", populate_when_writes_start)
    thread = prefault.populate_in_background(array, "test")
    assert thread is not None
    for count, at in enumerate(positions):
        array[at] = at + 1
        if count == 10:
            started.set()                      # the kernel pages in while the rest are written
    thread.join()
    expected = np.zeros_like(array)
    expected[positions] = positions + 1
    np.testing.assert_array_equal(array, expected)


def test_a_small_array_gets_no_thread():
    assert prefault.populate_in_background(np.zeros(MIB, np.uint8), "small") is None


@needs_populate
def test_a_tables_large_cache_is_resident_once_paged_in_and_serves_the_same_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(prefault, "BACKGROUND_BYTES", 8 * MIB)
    store = Store(str(tmp_path / "db"))
    store.create_table(table_config("big", dim=16, rows=1 << 18, ways=32))
    cache = store.table("big").cache
    assert cache.paging_in is not None
    cache.paging_in.join()
    assert resident_fraction(cache.slab) == 1.0
    ids = np.arange(0, 5000, 3)
    weights = np.random.default_rng(1).standard_normal((len(ids), 16)).astype(np.float32)
    store.update("big", ids, weights)
    np.testing.assert_array_equal(store.lookup("big", ids).weights, weights)
    store.create_table(table_config("small", dim=16))          # the default cache size
    small = store.table("small").cache
    assert (small.paging_in is None) == (small.slab.nbytes < prefault.BACKGROUND_BYTES)
    store.close()
