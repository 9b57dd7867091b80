"""`huge_pages.zeros`: numpy.zeros for the cache's large arrays, on memory the kernel may back with
2 MiB pages."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvstore import huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _mapping_fields(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address`."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@pytest.mark.parametrize("shape,dtype", [((1 << 20,), np.int64), ((20_000, 544), np.uint8), ((1 << 19, 2), np.int64)])
def test_large_arrays_are_zeroed_writable_and_shaped_like_numpy_zeros(shape, dtype):
    array = huge_pages.zeros(shape, dtype)
    assert array.shape == shape and array.dtype == np.dtype(dtype) and array.flags.writeable
    assert array.flags.c_contiguous and not array.any()
    array[-1] = 7
    other = huge_pages.zeros(shape, dtype)          # a fresh mapping, not shared with the first
    assert not other.any() and array[-1].all()


def test_small_arrays_are_plain_numpy_arrays():
    array = huge_pages.zeros((100, 8), np.float32)
    assert array.base is None and not array.any()


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_large_arrays_are_eligible_for_huge_pages():
    array = huge_pages.zeros((64 << 20,), np.uint8)
    array[::4096] = 1                               # touch every page
    fields = _mapping_fields(array.ctypes.data)
    if "THPeligible" not in fields:
        pytest.skip("this kernel's smaps does not report THPeligible")
    assert fields["THPeligible"] == "1"
