"""Starting and stopping: in-flight calls finish on SIGTERM, SIGINT exits cleanly, a taken port fails."""
from __future__ import annotations

import queue
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvstore_proto.tensors import decode_tensor, encode_ids
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc

from .conftest import small_table, wait_until


def serving(address: str) -> bool:
    """A fresh call to the health service answers SERVING (new calls are refused once shutdown begins)."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_lets_an_in_flight_stream_finish(start_server):
    from kvstore_client import KVStoreClient

    server = start_server("--grace-seconds", "600")   # the stream ends when the test says, however slow the machine
    with KVStoreClient(server.address) as client:
        small_table(client, "live", dim=4)
        client.update("live", [1, 2], np.ones((2, 4), np.float32))
    chunks: queue.Queue = queue.Queue()
    chunk = pb.LookupRequest(table="live", ids=encode_ids(np.array([1, 2])), on_miss=pb.ON_MISS_ERROR)
    with grpc.insecure_channel(server.address) as channel:
        responses = pb_grpc.EmbeddingStoreStub(channel).Lookup(iter(chunks.get, None), timeout=30)
        chunks.put(chunk)
        assert decode_tensor(next(responses).weights, "weights").shape == (2, 4)   # the call is in flight
        server.process.send_signal(signal.SIGTERM)
        assert wait_until(lambda: not serving(server.address))                    # shutdown has begun
        chunks.put(chunk)                                                          # still served
        np.testing.assert_array_equal(decode_tensor(next(responses).weights, "weights"), np.ones((2, 4)))
        chunks.put(None)
        assert list(responses) == []
    assert server.process.wait(30) == 0


def test_sigint_stops_cleanly(start_server):
    server = start_server()
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(30) == 0


def test_a_taken_port_fails_to_start_naming_the_port(start_server, tmp_path):
    server = start_server()
    port = server.address.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "-m", "kvstore_server", "--data-dir", str(tmp_path / "other"),
                             "--port", port], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "port" in result.stderr
    assert server.alive()


def test_a_stream_held_open_past_the_grace_period_is_cancelled_and_the_server_exits(start_server, tmp_path):
    config = tmp_path / "server.yaml"
    config.write_text("grace_seconds: 0.5\n")
    server = start_server("--config", str(config))
    chunks: queue.Queue = queue.Queue()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EmbeddingStoreStub(channel)
        stub.CreateTable(pb.CreateTableRequest(config=pb.TableConfig(name="held", dim=2)), timeout=10)
        responses = stub.Lookup(iter(chunks.get, None), timeout=60)
        chunks.put(pb.LookupRequest(table="held", ids=encode_ids(np.array([1]))))
        next(responses)
        server.process.send_signal(signal.SIGTERM)          # the client never ends its stream
        assert server.process.wait(20) == 0
        chunks.put(None)
        with pytest.raises(grpc.RpcError) as caught:
            next(responses)
        assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
