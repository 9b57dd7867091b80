"""Keep freed memory for reuse: large buffers without page faults.

glibc serves allocations over its mmap threshold with fresh pages and returns them on free,
so every large buffer (a received message, a chunk of rows) pays a page fault per 4 KiB when
first written: on virtual machines that costs as much as the work on the buffer. Raising the
threshold and the trim threshold lets malloc reuse freed heap memory instead. The server does
this at start, and so do the `kvstore export` and `kvstore import` commands (about 0.1 s of
CPU less per 500 MiB) and every `KVStoreClient` (unless made with `keep_freed_memory=False`):
on a 2-core VM a client's network lookup of 4,096 rows of 512 bytes took 8.1-9.3 ms of the
calling thread's CPU with glibc's defaults and 1.8-2.1 ms tuned (docs/benchmarks.md, stop 23). Only glibc has `mallopt`;
elsewhere this does nothing.

Freed memory is kept per malloc arena, and glibc gives threads up to 8 arenas per core: the
server's store and RocksDB read threads each held tens of MiB of freed buffers in their own
arena (47 MiB over five arenas, about 50 bytes per cached row, with a 1M-row cache full).
`ARENAS` arenas share that memory instead (bench/suites/memory.py measured 630 against
664-695 bytes per 512-byte row; one arena gave 604, but makes every thread's large
allocations wait on one lock). Python's own small objects never use these arenas.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("kvstore")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20     # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD = 256 << 20    # free memory kept at the top of the heap before it is returned
M_ARENA_MAX = -8
ARENAS = 2                    # malloc arenas the threads of the process share


def libc_function(name: str):
    """A C library function by name (from the process's own symbols, else the library found
    by name), or None where the C library has none by that name."""
    for library in (None, ctypes.util.find_library("c")):
        try:
            return getattr(ctypes.CDLL(library), name)
        except (OSError, AttributeError, TypeError):
            continue
    return None


def keep_freed_memory(arenas: int | None = ARENAS) -> bool:
    """Tune glibc malloc as above; returns whether it took effect. `arenas`: cap the malloc
    arenas at this many (None: leave them as they are; a client does, so a trainer's own threads
    keep theirs)."""
    mallopt = libc_function("mallopt")
    if mallopt is None:
        return False
    options = [(M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    if arenas is not None:
        options.append((M_ARENA_MAX, arenas))
    done = all(bool(mallopt(option, value)) for option, value in options)
    log.debug("malloc tuned for buffer reuse: %s", done)
    return done
