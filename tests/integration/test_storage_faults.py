"""A real server on a real full disk (a small tmpfs, filled by a filler file): health goes
NOT_SERVING and writes are UNAVAILABLE naming the reason while reads go on; the server recovers
by itself once space returns; SIGTERM during the fault exits 0. Skipped where tmpfs cannot be mounted."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvstore_client import KVStoreClient
from kvstore_client.errors import UnavailableError
from small_disk import fill, free, mounted

from .conftest import wait_until

DIM = 32


@pytest.fixture
def disk(tmp_path):
    with mounted(tmp_path / "disk") as path:
        yield path


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def start_on(start_server, disk):
    return start_server("--rocksdb-write-buffer-bytes", str(1 << 20), "--rocksdb-block-cache-bytes", str(1 << 20),
                        data_dir=disk / "data")


def full_server(start_server, disk, ids: np.ndarray):
    """A server with a write-through table holding ones for `ids`, on a disk then filled up."""
    server = start_on(start_server, disk)
    with KVStoreClient(server.address, timeout=30.0) as client:
        client.create_table("wt", DIM, cache={"rows": 512, "ways": 32, "write": "write_through"})
        client.update("wt", ids, np.ones((len(ids), DIM), np.float32))
        assert health(server.address) == health_pb2.HealthCheckResponse.SERVING
    fill(disk)
    return server


def write_until_unavailable(client: KVStoreClient, ids: np.ndarray) -> np.ndarray:
    """Acknowledged values of the last update before the disk refused one (ones: written before the disk filled)."""
    acked = np.ones((len(ids), DIM), np.float32)
    for seed in range(10_000):
        values = np.random.default_rng(seed).standard_normal((len(ids), DIM)).astype(np.float32)
        try:
            client.update("wt", ids, values)
        except UnavailableError as exc:
            assert "disk is full" in str(exc)
            return acked
        acked = values
    raise AssertionError("the disk never filled up")


def test_a_full_disk_turns_health_not_serving_until_space_returns(start_server, disk):
    ids = np.arange(300)
    server = full_server(start_server, disk, ids)
    with KVStoreClient(server.address, timeout=30.0) as client:
        acked = write_until_unavailable(client, ids)
        assert health(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        np.testing.assert_array_equal(client.lookup("wt", ids), acked)          # reads go on
        free(disk)
        assert wait_until(lambda: health(server.address) == health_pb2.HealthCheckResponse.SERVING, 30)
        client.update("wt", ids, np.zeros((len(ids), DIM), np.float32))
    server = server.restart()
    with KVStoreClient(server.address, timeout=30.0) as client:
        np.testing.assert_array_equal(client.lookup("wt", ids, on_miss="error"), np.zeros((len(ids), DIM)))


def test_sigterm_during_a_storage_fault_exits_zero(start_server, disk):
    ids = np.arange(300)
    server = full_server(start_server, disk, ids)
    with KVStoreClient(server.address, timeout=30.0) as client:
        acked = write_until_unavailable(client, ids)
    assert server.stop() == 0
    free(disk)
    server = start_on(start_server, disk)
    with KVStoreClient(server.address, timeout=30.0) as client:
        np.testing.assert_array_equal(client.lookup("wt", ids, on_miss="error"), acked)
