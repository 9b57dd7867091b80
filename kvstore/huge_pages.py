"""Zeroed host arrays on transparent huge pages, for the cache tier's large random-access arrays.

A lookup touches rows at random all over the slab, and the probe reads keys and
hints at random: with 4 KiB pages nearly every row costs a TLB miss and a page
walk. Linux maps 2 MiB pages where a region is marked `MADV_HUGEPAGE` (most
distributions enable transparent huge pages in "madvise" mode), which covers a
slab of gigabytes with the TLB's entries. Measured with `bench/store_bench.py`
(docs/benchmarks.md). Memory is still zero-filled by the kernel on first touch,
like `numpy.zeros`; only its granule grows. Elsewhere (no `madvise`, small arrays)
this is `numpy.zeros`.
"""
from __future__ import annotations

import mmap

import numpy as np

HUGE_PAGE = 2 << 20
MIN_BYTES = 4 * HUGE_PAGE       # smaller arrays gain little and would round up to whole huge pages


def zeros(shape, dtype) -> np.ndarray:
    """`numpy.zeros(shape, dtype)`, backed by an anonymous mapping advised to use huge pages
    when it is large enough and the platform has `MADV_HUGEPAGE`."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < MIN_BYTES or advice is None:
        return np.zeros(shape, dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(advice)
    except OSError:                 # a kernel without transparent huge pages: plain pages
        pass
    return np.frombuffer(region, dtype=dtype, count=count).reshape(shape)
