"""The host cache tier's hot loops, compiled with Numba, prefetching the memory they read ahead.

A lookup of cached rows reads hint entries, stamps and rows at random from arrays far
larger than the CPU caches, so memory latency, not bandwidth, sets its speed: NumPy's
fancy indexing visits one element after the other and waits for each one's cache
lines. These loops ask for the lines of the element `PREFETCH_ROWS` ahead before
handling the current one, copy each row with one `memcpy`, and run without the GIL.
On a 2-core VM, 4,096 random 512-byte rows of a 285 MB slab took 0.50 ms against
NumPy's 1.2-1.4 ms. `read_hits` is a cached lookup's whole pass over its rows (access
record and gather) in one loop; `probe_slots` finds their slots. This module checks the
arrays and calls the loops, which live in `host_loops`, imported on first use.

A batch of at least 2 x `PARALLEL_ROWS` rows is split over up to `THREADS` threads
(`set_threads`, the server's `host_threads`; the loops hold no GIL): one thread's random
reads keep only a few misses in flight, far fewer than a multi-core host's memory serves.
On a 16-core host, 65,536 random 512-byte rows of a 2.3 GB slab took 6.3 ms in one
thread, 2.1 ms in four and 1.5 ms in eight.
"""
from __future__ import annotations

import functools
import importlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PARALLEL_ROWS = 4096                      # rows a thread takes at least: below, a hand-off costs what it saves
MAX_THREADS = 64                          # the most `set_threads` takes


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")                 # cgroup v2: "<quota> <period>" or "max ..."
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")    # cgroup v1: -1 when there is none
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a container's CPU quota where
    one is set (`os.cpu_count()` counts the host's: a pod limited to 2 CPUs on a 64-core node
    would split every batch 8 ways and be throttled)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_quota() -> int:
    """The container's CPU quota rounded up to whole CPUs; 0 when none is set or readable."""
    try:
        try:
            quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        except OSError:
            quota, period = CGROUP_V1_QUOTA.read_text().strip(), CGROUP_V1_PERIOD.read_text().strip()
        if quota in ("max", "-1") or int(period) <= 0:
            return 0
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return 0


def default_threads() -> int:
    """Eight threads keep a 16-core host's memory busy (measured above); fewer CPUs, fewer."""
    return min(8, usable_cpus())


THREADS = default_threads()


@functools.cache
def _loops():
    """The compiled loops (`host_loops`), imported on the first call."""
    return importlib.import_module(".host_loops", __package__)


def warm() -> None:
    """Import and load every loop now (a server does this as it starts, so that its first
    lookup does not wait for the compiler)."""
    slab = np.zeros((4, 64), np.uint8)
    gather_rows(slab, np.arange(2))
    scatter_rows(slab, np.arange(2), np.zeros((2, 64), np.uint8))
    probe_slots(np.full((4, 2), -1, np.int64), np.uint64(3), np.zeros(4, np.int64), np.zeros(4, bool),
                np.zeros(4, np.uint16), 4, np.arange(2), np.arange(2, dtype=np.uint64))
    read_hits(slab, 0, 1, 0, np.zeros(4, np.int64), 1, None, np.arange(2), (8, np.empty((2, 8), np.uint8)))


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, THREADS - 1), thread_name_prefix="kvstore-rows")


def set_threads(threads: int = 0) -> None:
    """Split a large batch over at most `threads` threads (0: min(8, usable CPUs); 1: never split).
    A server next to a trainer may want fewer, leaving the trainer its cores."""
    global THREADS
    if not 0 <= threads <= MAX_THREADS:
        raise ValueError(f"threads: must be in [0, {MAX_THREADS}], got {threads}")
    THREADS = threads or default_threads()
    if _pool.cache_info().currsize:
        _pool().shutdown(wait=False)            # idle workers end; the next split starts a pool of the new size
        _pool.cache_clear()


def _parts(n: int) -> int:
    """Threads for a batch of n rows: a power of two, each taking at least PARALLEL_ROWS."""
    parts = 1
    while parts * 2 <= THREADS and n >= parts * 2 * PARALLEL_ROWS:
        parts *= 2
    return parts


_splitting = threading.Lock()            # held by the one batch being split


def _after_fork_in_child() -> None:
    """A forked child (a data loader worker, say) has none of its parent's pool threads, and
    perhaps a lock its parent held: it starts its own pool when it first splits a batch."""
    global _splitting
    _splitting = threading.Lock()
    _pool.cache_clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _in_parts(n: int, call) -> list:
    """call(part, parts) for each part of an n-row batch: all but the first in the pool, the
    first in this thread; returns their results once every part is done. One batch is split
    at a time: while one is, others run whole (the cores are busy already, and a split batch
    costs more CPU in all than a whole one)."""
    parts = _parts(n)
    if parts == 1 or not _splitting.acquire(blocking=False):
        return [call(0, 1)]
    try:
        futures = [_pool().submit(call, part, parts) for part in range(1, parts)]
        try:
            first = call(0, parts)
        finally:
            results = [future.result() for future in futures]
        return [first, *results]
    finally:
        _splitting.release()


def _refuse_bad_slot(results: list[int], slots: np.ndarray, capacity: int) -> None:
    """IndexError naming a slot outside the cache, when a loop's part reported one (>= 0)."""
    bad = max(results)
    if bad >= 0:
        raise IndexError(f"slots: slot {slots[bad]} is outside a cache of {capacity} slots")


def _flat_bytes(out: np.ndarray) -> np.ndarray:
    """The bytes of an output array as a flat view (a reshape of a strided array would copy)."""
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out: the rows' destination must be a writable C-contiguous array")
    return out.reshape(-1).view(np.uint8)


def gather_rows(slab: np.ndarray, slots: np.ndarray, offset: int = 0, nbytes: int | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
    """Bytes [offset, offset + nbytes) of the rows `slots` of `slab` (C-contiguous [capacity,
    row_bytes] uint8) as [n, nbytes] uint8, in `out` if given (any C-contiguous buffer of
    n * nbytes bytes). A negative slot leaves its row in `out` as it was."""
    capacity, row_bytes = slab.shape
    nbytes = row_bytes - offset if nbytes is None else nbytes
    if not (slab.flags.c_contiguous and slab.dtype == np.uint8 and 0 <= offset and offset + nbytes <= row_bytes):
        raise ValueError("gather_rows: slab must be C-contiguous uint8 rows holding [offset, offset + nbytes)")
    slots = np.ascontiguousarray(slots, dtype=np.int64)
    if out is None:
        out = np.empty((len(slots), nbytes), np.uint8)
    flat = _flat_bytes(out)
    if flat.nbytes != len(slots) * nbytes:
        raise ValueError(f"gather_rows: out holds {flat.nbytes} bytes, the rows {len(slots) * nbytes}")
    if len(slots) and nbytes:
        source, rows = slab.reshape(-1), flat.reshape(len(slots), -1)

        def gather(part: int, parts: int) -> int:     # a contiguous share of the rows
            share = -(-len(slots) // parts)
            at = slice(part * share, (part + 1) * share)
            bad = _loops().gather(source, row_bytes, offset, nbytes, slots[at], rows[at].reshape(-1))
            return bad if bad < 0 else bad + part * share

        _refuse_bad_slot(_in_parts(len(slots), gather), slots, capacity)
    return out


def scatter_rows(slab: np.ndarray, slots: np.ndarray, rows: np.ndarray) -> None:
    """Rows ([n, row_bytes]) into `slots` of `slab` (C-contiguous [capacity, row_bytes] uint8), each
    row's lines asked for ahead and moved whole; a later row of a repeated slot wins. Every slot
    is checked first: one outside the slab is IndexError with nothing written."""
    capacity, row_bytes = slab.shape
    rows = np.ascontiguousarray(rows)
    slots = np.ascontiguousarray(slots, dtype=np.int64)
    if not (slab.flags.c_contiguous and slab.dtype == np.uint8 and rows.dtype == np.uint8
            and rows.shape == (len(slots), row_bytes)):
        raise ValueError(f"scatter_rows: rows of shape {rows.shape} and dtype {rows.dtype} for {len(slots)} slots "
                         f"of {row_bytes} bytes")
    if not len(slots):
        return
    source, flat = rows.reshape(-1), slab.reshape(-1)
    _refuse_bad_slot(_in_parts(len(slots), lambda part, parts: _loops().scatter(flat, row_bytes, slots, source,
                                                                                np.int64(part), np.int64(parts))),
                     slots, capacity)


def probe_slots(hints: np.ndarray, mask: np.uint64, keys: np.ndarray, occupied: np.ndarray, fingerprints: np.ndarray,
                ways: int, ids: np.ndarray, mixed: np.ndarray) -> np.ndarray:
    """The slot of each id in the set-associative cache, -1 where it is not cached.
    First the id's (key, slot) pair in `hints` ([size, 2] int64, at `mixed & mask`); failing
    that, the ways of its set (from the top bits of `mixed`) by 16-bit fingerprint (its low
    bits; `fill` writes a slot's key and fingerprint together), verified against `keys` and
    `occupied`; an id found that way is hinted again."""
    slots = np.empty(len(ids), np.int64)
    arguments = (hints.reshape(-1), np.uint64(mask), keys, occupied, fingerprints, np.int64(ways),
                 np.uint64(len(keys) // ways), np.ascontiguousarray(ids, np.int64),
                 np.ascontiguousarray(mixed, np.uint64), slots)
    _in_parts(len(ids), lambda part, parts: _loops().probe(*arguments, np.uint64(part), np.int64(parts)))
    return slots


def read_hits(slab: np.ndarray, header_word: int, max_count: int, now: int, last_used: np.ndarray, tick: int,
              uses: np.ndarray | None, slots: np.ndarray, weights: tuple[int, np.ndarray],
              state: tuple[int, np.ndarray] | None = None) -> None:
    """A batch's use of cached `slots` and the gather of their columns, in one pass: the slot
    stamped with `tick` in `last_used` (and `uses` + 1, if given) and its header's count + 1
    (saturating at `max_count`) and last_access = `now` (uint32 words `header_word`, + 1),
    each once per slot however often it repeats, as `touch` and `touch_headers` do; then bytes
    [offset, offset + out's row size) of each row into `weights` = (offset, [n, k] out) and
    likewise `state`. A negative slot (not cached) is skipped: nothing recorded, its rows in the
    outs left as they were. Once per slot holds for a batch's first call (the slots stamped
    `tick` before it are taken as counted), so call it right after `begin_batch`."""
    capacity, row_bytes = slab.shape
    if not (slab.flags.c_contiguous and slab.dtype == np.uint8 and row_bytes % 4 == 0):
        raise ValueError("read_hits: slab must be C-contiguous uint8 rows of a multiple of 4 bytes")
    slots = np.ascontiguousarray(slots, dtype=np.int64)
    columns = []
    for offset, out in (weights, state or (0, np.empty((len(slots), 0), np.uint8))):
        flat = _flat_bytes(out)
        nbytes = flat.nbytes // max(1, len(slots))
        if flat.nbytes != len(slots) * nbytes or offset + nbytes > row_bytes:
            raise ValueError(f"read_hits: out of {flat.nbytes} bytes for {len(slots)} rows at offset {offset}")
        columns += [offset, nbytes, flat]
    if not len(slots):
        return
    flat = slab.reshape(-1)
    arguments = (flat, flat.view(np.uint32), row_bytes, header_word, np.uint32(max_count), np.uint32(now), last_used,
                 np.int64(tick), uses if uses is not None else np.empty(0, np.int64), uses is not None, slots, *columns)
    _refuse_bad_slot(_in_parts(len(slots), lambda part, parts: _loops().read_hits(*arguments, np.int64(part),
                                                                                  np.int64(parts))),
                     slots, capacity)
