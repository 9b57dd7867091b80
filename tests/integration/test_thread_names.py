"""Threads of a running server carry their names at the OS level (`top -H`, `/proc/<pid>/task/*/comm`)."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from kvstore.thread_names import OS_NAME_BYTES, os_named, os_thread_name

from .conftest import random_rows, small_table

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names are read from /proc")


def os_names(pid: int | str) -> list[str]:
    return [(task / "comm").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir()]


@linux_only
def test_a_server_s_threads_are_named_for_what_they_do(server, client):
    small_table(client, "named_threads")                      # runs in a store thread
    client.update("named_threads", [1, 2], random_rows(2, 8))
    names = os_names(server.process.pid)
    assert {"kvstore-writer", "kvstore-flusher", "kvstore-store_0"} <= set(names), names


@linux_only
def test_a_thread_started_with_os_named_takes_its_python_name():
    seen = []

    def record():
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())

    worker = threading.Thread(target=os_named(record), name="kvstore-some-long-purpose")
    worker.start()
    worker.join()
    assert seen == ["some-long-purpo"]


def test_names_too_long_for_the_os_lose_the_prefix_first():
    assert os_thread_name("kvstore-store_3") == b"kvstore-store_3"            # fits: unchanged
    assert os_thread_name("kvstore-store_12") == b"store_12"                 # 16 bytes: the prefix goes
    assert os_thread_name("rocks-read_0") == b"rocks-read_0"
    assert os_thread_name("a-very-long-thread-name") == b"a-very-long-thr"
    assert len(os_thread_name("kvstore-doorbell-connection")) == OS_NAME_BYTES
