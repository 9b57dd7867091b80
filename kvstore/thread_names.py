"""The store's and server's threads named where the OS shows them.

`top -H`, `ps -L`, `/proc/<pid>/task/*/comm`, perf and py-spy's native frames read a thread's
name from the kernel. Before 3.14 Python names only its own Thread objects, so every thread of
a server shows as `python3` and an operator cannot tell the event loop from the store threads
or the RocksDB writer. Threads the store and server start call `name_this_thread` first (an
executor's `initializer`, or a target wrapped by `os_named`). From 3.14 Python does this itself.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

OS_NAME_BYTES = 15          # Linux keeps 16 bytes with the terminating NUL
PREFIX = b"kvstore-"        # the first thing to go from a name too long for the OS
_PR_SET_NAME = 15


def _prctl():
    """libc's prctl where Python does not name threads itself (Linux before 3.14), else None."""
    if not sys.platform.startswith("linux") or sys.version_info >= (3, 14):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def os_thread_name(name: str) -> bytes:
    """`name` as the OS keeps it: at most 15 bytes, without the `kvstore-` prefix when it would
    not fit with it (so `kvstore-store_10` and `kvstore-store_11` stay apart as `store_10`, `store_11`)."""
    raw = name.encode("utf-8", "replace")
    if len(raw) > OS_NAME_BYTES and raw.startswith(PREFIX):
        raw = raw[len(PREFIX):]
    return raw[:OS_NAME_BYTES]


def name_this_thread() -> None:
    """Give the calling OS thread the name of its Python thread (a no-op where that is not needed
    or not possible)."""
    if _PRCTL is None:
        return
    try:
        _PRCTL(_PR_SET_NAME, ctypes.c_char_p(os_thread_name(threading.current_thread().name)), 0, 0, 0)
    except Exception:       # a name is for people reading `top`: it must never break a pool's start
        return


def os_named(target: Callable[..., T]) -> Callable[..., T]:
    """`target`, for a thread that first takes its Python name at the OS level."""
    @functools.wraps(target)
    def run(*args, **kwargs) -> T:
        name_this_thread()
        return target(*args, **kwargs)
    return run
