"""Large batches of rows split over threads: how many, and the pool that runs the parts.

One thread's random reads of cached rows keep only a few cache misses in flight, far
fewer than a multi-core host's memory serves. So a batch of at least 2 x `PARALLEL_ROWS`
rows is split over up to `THREADS` threads (a power of two; `set_threads`, the server's
`host_threads`), each part run by a compiled loop that holds no GIL (`host_kernels`).
On a 16-core host, 65,536 random 512-byte rows of a 2.3 GB slab took 6.3 ms in one
thread, 2.1 ms in four and 1.5 ms in eight. The default counts the CPUs this process may
use, a container's CPU quota included.
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .thread_names import name_this_thread

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
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, THREADS - 1), thread_name_prefix="kvstore-rows",
                              initializer=name_this_thread)


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


def in_parts_split(n: int) -> bool:
    """Whether `in_parts` may split a batch of n rows over threads."""
    return _parts(n) > 1


def in_parts(n: int, call) -> list:
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
