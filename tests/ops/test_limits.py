"""Request limits: ids per request, message size, concurrent calls; beyond each, RESOURCE_EXHAUSTED."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from gpu.conftest import gpu_usable
from kvstore_client import FailedPreconditionError, KVStoreClient, ResourceExhaustedError
from kvstore_proto.tensors import encode_ids
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc

from .conftest import free_port, scrape, value, wait_until

MAX_MESSAGE = 64 << 10
MAX_CALLS = 2


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--max-message-bytes", str(MAX_MESSAGE), "--max-request-rows", "300",
                        "--max-concurrent-rpcs", str(MAX_CALLS), metrics_port=free_port())


@pytest.fixture(scope="module")
def client(server):
    # The client may send more than the server takes, so the server's limit is what is tested.
    with KVStoreClient(server.address, timeout=30, max_message_bytes=4 << 20, chunk_bytes=1 << 20) as opened:
        opened.create_table("limited", 32, cache={"rows": 64, "ways": 8})
        opened.update("limited", [1, 2], np.ones((2, 32), np.float32))
        yield opened


def _unchanged(client: KVStoreClient) -> None:
    rows = client.lookup("limited", [1, 2, 500], on_miss="zeros")
    np.testing.assert_array_equal(rows, np.array([[1] * 32, [1] * 32, [0] * 32], np.float32))


def test_message_over_the_size_limit_is_resource_exhausted_and_changes_nothing(client):
    ids = np.arange(600)                           # 600 rows x 32 float32: 77 KiB in one message
    with pytest.raises(ResourceExhaustedError):
        client.update("limited", ids, np.full((600, 32), 5, np.float32))
    _unchanged(client)


def test_ids_over_the_request_limit_are_resource_exhausted_and_change_nothing(server, client):
    with KVStoreClient(server.address, timeout=30, chunk_bytes=8 << 10) as chunked:   # messages under the limit
        with pytest.raises(ResourceExhaustedError) as error:
            chunked.update("limited", np.arange(301), np.full((301, 32), 5, np.float32))
    assert error.value.message.startswith("ids")
    _unchanged(client)


def test_calls_beyond_the_concurrency_limit_are_resource_exhausted(server, client):
    release = threading.Event()

    def held_requests():
        yield pb.LookupRequest(table="limited", ids=encode_ids(np.array([1])))
        release.wait(30)                        # the stream stays open until released

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EmbeddingStoreStub(channel)
        held = [stub.Lookup(held_requests(), timeout=60) for _ in range(MAX_CALLS)]
        try:
            for call in held:
                next(call)                      # each stream answered its first chunk: both are in flight
            assert wait_until(lambda: value(scrape(server), "kvstore_rpc_in_flight", method="Lookup") == MAX_CALLS)
            with pytest.raises(ResourceExhaustedError):
                client.list_tables()
        finally:
            release.set()
            for call in held:
                list(call)
    assert client.list_tables() == ["limited"]


def test_tables_beyond_max_tables_are_refused_and_the_others_keep_serving(start_server):
    server = start_server("--max-tables", "2")
    with KVStoreClient(server.address, timeout=30) as client:
        client.create_table("first", 4, cache={"rows": 64, "ways": 8})
        client.create_table("second", 4, cache={"rows": 64, "ways": 8})
        with pytest.raises(ResourceExhaustedError) as refused:
            client.create_table("third", 4, cache={"rows": 64, "ways": 8})
        assert refused.value.message.startswith("max_tables")
        assert client.list_tables() == ["first", "second"]
        client.drop_table("second")
        client.create_table("third", 4, cache={"rows": 64, "ways": 8})       # room again


def test_caches_beyond_max_cache_bytes_are_refused_naming_the_budget(start_server):
    budget = 1 << 20
    server = start_server("--max-cache-bytes", str(budget))
    with KVStoreClient(server.address, timeout=30) as client:
        client.create_table("small", 8, cache={"rows": 1024, "ways": 32})   # 1024 x (48 + 56) bytes: fits
        with pytest.raises(ResourceExhaustedError) as refused:
            client.create_table("big", 128, cache={"rows": 1 << 16, "ways": 32})
        assert refused.value.message.startswith("cache.rows") and "max_cache_bytes" in refused.value.message
        assert client.list_tables() == ["small"]
        assert client.lookup("small", np.arange(4)).shape == (4, 8)


def test_a_gpu_tables_host_tier_counts_against_max_cache_bytes_and_its_gpu_slots_do_not(start_server):
    server = start_server("--max-cache-bytes", str(1 << 20))
    with KVStoreClient(server.address, timeout=30) as client:
        with pytest.raises(ResourceExhaustedError) as refused:     # 8192 x (528 + 56) bytes of host tier
            client.create_table("tiered", 128, cache={"rows": 1024, "ways": 32, "device": "cuda", "host_rows": 8192})
        assert refused.value.message.startswith("cache.host_rows") and "max_cache_bytes" in refused.value.message
        try:                                         # 65536 GPU slots of 528 bytes: device memory, not counted
            client.create_table("gpu_only", 128, cache={"rows": 1 << 16, "ways": 32, "device": "cuda"})
        except FailedPreconditionError as missing:   # this machine has no GPU: refused for that, not the budget
            assert not gpu_usable() and missing.message.startswith("cache.device")
        assert "tiered" not in client.list_tables()
