"""Page in a large cache's memory before its first writes, off the request path.

A host cache's slab is allocated zeroed and untouched (`np.zeros`: the kernel maps pages on
first write). Rows land in random slots, so a fresh cache's first writes fault in pages all
over it, one fault at a time, inside the requests that write them: on a 2-core VM the first
`apply_gradients` of 1,500 new ids into a new table of 1M slots (a 528 MiB slab) took 122-182
ms, and 12-16 ms with the slab paged in ahead, which took 152-161 ms in a thread of its own
(docs/benchmarks.md, stop 35). Every new or reopened table with a large cache paid that in its
first requests, after each restart too.

`populate` asks Linux (5.14 and later) to fault the pages in as if written, without writing
them (`MADV_POPULATE_WRITE`): it never changes what the memory holds, so it can run in a
thread while the table serves requests. Elsewhere it does nothing and pages fault in on use,
as before. Populated memory is resident from then on: a cache costs its full size at once
(with transparent huge pages, random slots made it resident within its first rows anyway).
"""
from __future__ import annotations

import ctypes
import logging
import sys
import threading

import numpy as np

from .thread_names import os_named

log = logging.getLogger("kvstore")

MADV_POPULATE_WRITE = 23        # <linux/mman.h>, Linux 5.14
PAGE = 4096
BACKGROUND_BYTES = 256 << 20    # smaller arrays fault in quickly enough on use (the default cache: 33 MiB)


def _madvise():
    """libc's madvise from the process's own symbols (no library search: this loads with the
    store, in every process); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _madvise()


def populate(array: np.ndarray) -> bool:
    """Fault in every page of `array`'s memory (contiguous) as if written, without writing it;
    False where the system cannot (not Linux, or a kernel before 5.14). Holds no GIL while the
    kernel works (ctypes releases it)."""
    if _MADVISE is None or not array.nbytes:
        return False
    start = array.ctypes.data & ~(PAGE - 1)
    length = array.ctypes.data + array.nbytes - start
    if _MADVISE(start, length, MADV_POPULATE_WRITE) != 0:
        log.debug("cannot page in %d bytes ahead (errno %d)", length, ctypes.get_errno())
        return False
    return True


def populate_in_background(array: np.ndarray, what: str) -> threading.Thread | None:
    """`populate(array)` in a daemon thread when the array is at least BACKGROUND_BYTES (the
    thread keeps it alive until done); None for a smaller array, or where `populate` cannot."""
    if _MADVISE is None or array.nbytes < BACKGROUND_BYTES:
        return None
    thread = threading.Thread(target=os_named(populate), args=(array,), name=f"kvstore-page-in {what}", daemon=True)
    thread.start()
    return thread
