"""The asyncio server: requests parsed by the service, admission with a retry hint, UNAVAILABLE
during shutdown, reflection under v1 and v1alpha, table races ending in a named status code."""
from __future__ import annotations

import queue
import signal
import threading
import uuid

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2
from kvstore_client import KVStoreClient
from kvstore_proto.tensors import encode_ids
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc

from .conftest import small_table, wait_until
from .test_lifecycle import serving

SERVICE = "/kvstore.v1.EmbeddingStore/"
MALFORMED = b"\xff\xff\xff\xff"          # field 0 / bad varint: no protobuf parser accepts it
RACE_CODES = {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED,
              grpc.StatusCode.FAILED_PRECONDITION}


def _raw(channel: grpc.Channel, method: str, streaming_request: bool):
    make = channel.stream_unary if streaming_request else channel.unary_unary
    return make(SERVICE + method, request_serializer=None, response_deserializer=None)


def test_malformed_requests_are_invalid_argument_naming_the_method_and_the_connection_keeps_serving(server):
    small_table_client = KVStoreClient(server.address)
    small_table(small_table_client, "after_garbage")
    small_table_client.close()
    methods = [("CreateTable", False), ("DescribeTable", False), ("Update", True), ("ApplyGradients", True),
               ("Import", True), ("Release", False), ("KeepAlive", False)]
    with grpc.insecure_channel(server.address) as channel:
        for attempt in range(100):
            method, streaming = methods[attempt % len(methods)]
            call = _raw(channel, method, streaming)
            with pytest.raises(grpc.RpcError) as raised:
                call(iter([MALFORMED]) if streaming else MALFORMED, timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value
            assert method in raised.value.details()
        stub = pb_grpc.EmbeddingStoreStub(channel)                     # the same connection
        response = stub.DescribeTable(pb.DescribeTableRequest(table="after_garbage"), timeout=10)
        assert response.config.name == "after_garbage"


def test_a_malformed_lookup_chunk_is_invalid_argument(server):
    with grpc.insecure_channel(server.address) as channel:
        lookup = channel.stream_stream(SERVICE + "Lookup", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as raised:
            list(lookup(iter([MALFORMED]), timeout=10))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Lookup" in raised.value.details()


@pytest.mark.parametrize("good_before", [1, 3])       # the second chunk is read directly, later ones ahead
def test_a_malformed_later_lookup_chunk_ends_the_stream_invalid_argument_after_the_earlier_answers(server,
                                                                                                   good_before):
    with KVStoreClient(server.address) as client:
        small_table(client, f"later_garbage_{good_before}", dim=4)
    good = pb.LookupRequest(table=f"later_garbage_{good_before}", ids=encode_ids(np.arange(3))).SerializeToString()
    with grpc.insecure_channel(server.address) as channel:
        lookup = channel.stream_stream(SERVICE + "Lookup", request_serializer=None, response_deserializer=None)
        responses = lookup(iter([good] * good_before + [MALFORMED, good]), timeout=10)
        answers = [next(responses) for _ in range(good_before)]
        with pytest.raises(grpc.RpcError) as raised:
            next(responses)
    assert all(pb.LookupResponse.FromString(a).weights.shape == [3, 4] for a in answers)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"chunk {good_before}" in raised.value.details()


def test_lookup_chunks_keep_request_order_when_some_go_to_store_threads_and_others_are_served_on_the_loop(server):
    """Chunks of unseen ids go to the store threads (they are initialized), cached ones are answered
    on the event loop: whichever way each chunk went, the answers come back in request order."""
    with KVStoreClient(server.address) as client:
        small_table(client, "mixed_chunks", dim=4, cache={"rows": 4096, "ways": 32})
        cached = np.arange(100, dtype=np.int64)
        client.update("mixed_chunks", cached, np.arange(400, dtype=np.float32).reshape(100, 4))
        fresh = np.arange(10_000, 10_100, dtype=np.int64)
        ids = np.concatenate([fresh[:25], cached[:25], fresh[25:50], cached[25:50], cached[50:], fresh[50:]])
        with KVStoreClient(server.address, chunk_bytes=25 * 16) as tiny:     # 25 rows per chunk
            first = tiny.lookup("mixed_chunks", ids)
        again = client.lookup("mixed_chunks", ids, on_miss="error")     # all stored and cached by now
    np.testing.assert_array_equal(first, again)
    where = np.isin(ids, cached)
    np.testing.assert_array_equal(first[where], np.arange(400, dtype=np.float32).reshape(100, 4)[ids[where]])


def test_calls_beyond_the_limit_are_resource_exhausted_with_a_retry_hint_and_health_still_answers(start_server):
    server = start_server("--max-concurrent-rpcs", "2", "--retry-after-ms", "75")
    release = threading.Event()

    def held():
        yield pb.LookupRequest(table="limited", ids=encode_ids(np.array([1])))
        release.wait(60)

    with KVStoreClient(server.address) as client, grpc.insecure_channel(server.address) as channel:
        small_table(client, "limited")
        stub = pb_grpc.EmbeddingStoreStub(channel)
        calls = [stub.Lookup(held(), timeout=60) for _ in range(2)]
        try:
            for call in calls:
                next(call)                            # both in flight
            with pytest.raises(grpc.RpcError) as raised:
                stub.ListTables(pb.ListTablesRequest(), timeout=10)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("retry-after-ms", "75") in raised.value.trailing_metadata()
            assert client.health() == "SERVING"
        finally:
            release.set()
            for call in calls:
                list(call)
        assert client.list_tables() == ["limited"]


def test_calls_arriving_during_shutdown_are_unavailable_not_cancelled(start_server):
    server = start_server("--grace-seconds", "600")   # the held stream ends when the test says, on any machine
    chunks: queue.Queue = queue.Queue()
    with KVStoreClient(server.address) as client:
        small_table(client, "draining")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EmbeddingStoreStub(channel)
        responses = stub.Lookup(iter(chunks.get, None), timeout=60)
        chunks.put(pb.LookupRequest(table="draining", ids=encode_ids(np.array([1]))))
        next(responses)                                         # in flight: it holds the shutdown open
        server.process.send_signal(signal.SIGTERM)
        assert wait_until(lambda: not serving(server.address), timeout=60)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ListTables(pb.ListTablesRequest(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        chunks.put(None)
        assert list(responses) == []
    assert server.process.wait(60) == 0


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_is_served_as_v1_and_v1alpha(server, version):
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        [response] = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    assert "kvstore.v1.EmbeddingStore" in {s.name for s in response.list_services_response.service}


def test_dropping_a_table_under_load_ends_calls_in_a_named_status(server):
    """Lookups, updates, deletes and snapshots racing a drop end OK, NOT_FOUND, ABORTED or
    FAILED_PRECONDITION (never INTERNAL, nor UNAVAILABLE blaming storage)."""
    seen: set = set()
    with KVStoreClient(server.address) as client, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EmbeddingStoreStub(channel)
        for _ in range(5):
            small_table(client, "dropped", 8)
            client.update("dropped", np.arange(512), np.ones((512, 8), np.float32))
            start = threading.Barrier(5)
            workers = [threading.Thread(target=_hammer, args=(stub, kind, start, seen))
                       for kind in ("Lookup", "Update", "Delete", "CreateSnapshot")]
            for worker in workers:
                worker.start()
            start.wait(30)
            client.drop_table("dropped")
            for worker in workers:
                worker.join(60)
    assert seen <= RACE_CODES, seen


def _hammer(stub, kind: str, start: threading.Barrier, seen: set) -> None:
    ids = encode_ids(np.arange(512))
    rows = pb.UpdateRequest(table="dropped", ids=ids, weights={"dtype": "float32", "shape": [512, 8],
                                                               "data": bytes(512 * 8 * 4)}, last=True)
    start.wait(30)
    for _ in range(20):
        try:
            if kind == "Lookup":
                list(stub.Lookup(iter([pb.LookupRequest(table="dropped", ids=ids)]), timeout=30))
            elif kind == "Update":
                stub.Update(iter([rows]), timeout=30)
            elif kind == "CreateSnapshot":
                stub.CreateSnapshot(pb.CreateSnapshotRequest(name=f"race-{uuid.uuid4().hex}"), timeout=60)
                continue                                # a snapshot does not stop at the drop
            else:
                stub.Delete(iter([pb.DeleteRequest(table="dropped", ids=ids, last=True)]), timeout=30)
            seen.add(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            seen.add(error.code())
            if error.code() == grpc.StatusCode.NOT_FOUND:
                assert "dropped" in error.details()
                return
