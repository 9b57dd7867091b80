"""The soak: 32 clients for 20 s of mixed load (80% lookups, 15% gradients, 5% updates and deletes,
Zipf ids, some holding prefetch locks, some cancelling mid-stream) through a real server. One run,
several promises: no unexpected error, the final state is the replay of the acknowledged calls,
cancelled writes left nothing, the server's memory stayed bounded. Latencies are printed, never
asserted; `python bench/soak.py --seconds N` runs it longer.
"""
from __future__ import annotations

import pytest
from kvstore_client import KVStoreClient

from .soak_workload import cancelled_rows, create_tables, replay_mismatches, run_soak

CLIENTS = 32
SECONDS = 20.0
RSS_BOUND = 1 << 30        # far above what the server needs, far below what a leak per call would reach
# All clients of one process share one HTTP/2 connection: 32 calls plus sessions and cancelled streams
# need more streams than the server's default of 32 per connection (beyond it: UNAVAILABLE, REFUSED_STREAM).
SERVER_ARGS = ("--max-concurrent-streams", "128")


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(*SERVER_ARGS)


@pytest.fixture(scope="module")
def soak(server):
    with KVStoreClient(server.address, timeout=60) as client:
        create_tables(client)
        result = run_soak(server.address, server.process.pid, CLIENTS, SECONDS)
        print("\n" + result.report())
        yield result, client


def test_soak_sees_no_unexpected_error_and_the_server_stays_up(soak, server):
    result, client = soak
    assert result.errors == [], f"{len(result.errors)} unexpected errors, e.g. {result.errors[:5]}"
    assert server.alive() and client.health() == "SERVING"
    assert result.calls > CLIENTS            # every client got calls through


def test_final_state_equals_the_replay_of_acknowledged_calls(soak):
    result, client = soak
    assert replay_mismatches(client, result.workers) == []


def test_cancelled_writes_leave_no_row(soak):
    _, client = soak
    assert cancelled_rows(client) == 0


def test_server_memory_stays_bounded(soak):
    result, _ = soak
    assert result.peak_rss_bytes < RSS_BOUND
