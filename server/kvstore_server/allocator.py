"""Keep freed memory for reuse: large buffers without page faults.

Every lookup chunk allocates a few buffers of its size (the gathered rows, the
serialized response). glibc serves allocations over its mmap threshold with
fresh pages and returns them on free, so each such buffer pays a page fault per
4 KiB when first written: on virtual machines that cost the same order as the
lookup itself. Raising the threshold and the trim threshold lets malloc reuse
freed heap memory instead (`kvstore_proto.freed_memory`, shared with the export and
import commands). Only glibc has `mallopt`; elsewhere this does nothing.

Bulk operations free far more than a lookup chunk needs again: an import's buffers
and RocksDB's flushed memtables; the row objects of many reads from RocksDB, freed
in the arena of each reading thread. `return_freed_memory` hands such pages back
once the operation is over (`DiskReads` says when reads were many), so resident
memory stays near what the rows take; lookups of cached rows never trigger it.
"""
from __future__ import annotations

from kvstore_proto.freed_memory import keep_freed_memory, libc_function

__all__ = ["DiskReads", "keep_freed_memory", "return_freed_memory"]

ROWS_READ_PER_TRIM = 1 << 17  # about 64 MiB of 512-byte rows from RocksDB between two trims


def return_freed_memory() -> bool:
    """Give free heap pages of every malloc arena back to the system (glibc `malloc_trim`);
    returns whether any were. Takes milliseconds per GiB of heap: call it after a bulk
    operation, not per lookup."""
    trim = libc_function("malloc_trim")
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
