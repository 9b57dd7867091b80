"""Keep freed memory for reuse: large buffers without page faults.

Every lookup chunk allocates a few buffers of its size (the gathered rows, the
serialized response). glibc serves allocations over its mmap threshold with
fresh pages and returns them on free, so each such buffer pays a page fault per
4 KiB when first written: on virtual machines that cost the same order as the
lookup itself. Raising the threshold and the trim threshold lets malloc reuse
freed heap memory instead. Only glibc has `mallopt`; elsewhere this does nothing.

Bulk operations free far more than a lookup chunk needs again: an import's buffers
and RocksDB's flushed memtables; the row objects of many reads from RocksDB, freed
in the arena of each reading thread. `return_freed_memory` hands such pages back
once the operation is over (`DiskReads` says when reads were many), so resident
memory stays near what the rows take; lookups of cached rows never trigger it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("kvstore_server")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20     # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD = 256 << 20    # free memory kept at the top of the heap before it is returned
ROWS_READ_PER_TRIM = 1 << 17  # about 64 MiB of 512-byte rows from RocksDB between two trims


def _libc_function(name: str):
    """A glibc function by name, or None where the C library has none by that name."""
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Tune glibc malloc as above; returns whether it took effect."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc tuned for buffer reuse: %s", done)
    return done


def return_freed_memory() -> bool:
    """Give free heap pages of every malloc arena back to the system (glibc `malloc_trim`);
    returns whether any were. Takes milliseconds per GiB of heap: call it after a bulk
    operation, not per lookup."""
    trim = _libc_function("malloc_trim")
    return bool(trim(0)) if trim is not None else False


class DiskReads:
    """Says when enough rows came from RocksDB since the last trim to return freed memory:
    a trim then costs milliseconds against seconds of reads."""

    def __init__(self, rows_per_trim: int = ROWS_READ_PER_TRIM):
        self.rows_per_trim = rows_per_trim
        self._trimmed_at = 0

    def due(self, rows_read: int) -> bool:
        """`rows_read`: the database's count so far (it starts again from 0 on a new database)."""
        if rows_read < self._trimmed_at:
            self._trimmed_at = 0
        if rows_read - self._trimmed_at < self.rows_per_trim:
            return False
        self._trimmed_at = rows_read
        return True
