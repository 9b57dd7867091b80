"""Dropping and re-creating a table while other clients use it: every call ends OK or with a code
that names the table (NOT_FOUND, ABORTED, FAILED_PRECONDITION), snapshots taken meanwhile succeed
or say why, never INTERNAL or a storage failure; another table is untouched. The drop cycles are
counted, not timed: each cycle waits for as many finished calls as there are workers (a semaphore),
and the workers run until the last cycle is done (an event)."""
from __future__ import annotations

import threading
from collections import Counter

import grpc
import numpy as np
from kvstore_client import KVStoreClient, KVStoreError

from .conftest import random_rows, small_table

CYCLES = 40
WORKERS = 8
RACED, KEPT = "raced", "kept"
RACE_CODES = {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED,
              grpc.StatusCode.FAILED_PRECONDITION}
KEPT_IDS = np.arange(16)
KEPT_ROWS = random_rows(16, 8, seed=4)


def race_call(client: KVStoreClient, kind: int, rng: np.random.Generator) -> None:
    ids = rng.integers(0, 5000, 256)
    if kind == 0:
        client.lookup(RACED, ids)
    elif kind == 1:
        client.update(RACED, ids, np.ones((256, 8), np.float32))
    elif kind == 2:
        client.delete(RACED, ids)
    else:
        client.create_snapshot(f"race-{rng.integers(1 << 40)}")


def worker(address: str, kind: int, stop: threading.Event, progress: threading.Semaphore, outcomes: Counter,
           wrong: list) -> None:
    rng = np.random.default_rng(kind)
    with KVStoreClient(address, timeout=60) as client:
        while not stop.is_set():
            try:
                race_call(client, kind % 4, rng)
                outcomes["OK"] += 1
            except KVStoreError as error:
                outcomes[error.code.name] += 1
                if error.code not in RACE_CODES or not error.message.startswith(("table", "name")):
                    wrong.append(f"{error.code.name}: {error.message}")
            progress.release()


def test_calls_racing_a_drop_end_in_a_code_naming_the_table(server, client):
    small_table(client, KEPT)
    client.update(KEPT, KEPT_IDS, KEPT_ROWS)
    small_table(client, RACED)
    stop, progress, outcomes, wrong = threading.Event(), threading.Semaphore(0), Counter(), []
    threads = [threading.Thread(target=worker, args=(server.address, kind, stop, progress, outcomes, wrong))
               for kind in range(WORKERS)]
    for thread in threads:
        thread.start()
    for _ in range(CYCLES):
        client.drop_table(RACED)
        small_table(client, RACED)
        for _ in range(WORKERS):           # every cycle overlaps as many calls, however fast each side runs
            progress.acquire()
    stop.set()
    for thread in threads:
        thread.join()
    assert server.alive()
    np.testing.assert_array_equal(client.lookup(KEPT, KEPT_IDS, on_miss="error"), KEPT_ROWS)
    assert wrong == [], f"{len(wrong)} calls of {sum(outcomes.values())} ended wrongly, e.g. {wrong[:3]}"
