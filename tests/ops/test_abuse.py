"""Abuse that needs no data: health watchers (no token needed) and floods of refused calls never
take the server from the other clients, and the log stays short and names who did it."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvstore_client import KVStoreClient, UnauthenticatedError

TOKEN = "a-token-the-abusers-do-not-have"
PER_PEER = 4


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    token = tmp_path_factory.mktemp("abuse") / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    return start_server("--auth-token-file", str(token), "--max-health-watches-per-peer", str(PER_PEER))


def test_health_watchers_beyond_the_per_peer_limit_are_refused_and_others_keep_being_served(server):
    channel = grpc.insecure_channel(server.address)
    stub = health_pb2_grpc.HealthStub(channel)
    watches = [stub.Watch(health_pb2.HealthCheckRequest()) for _ in range(PER_PEER)]
    try:
        for watch in watches:                   # each stream is open: its first status arrived
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        for _ in range(3):
            extra = stub.Watch(health_pb2.HealthCheckRequest())
            with pytest.raises(grpc.RpcError) as refused:
                next(extra)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_health_watches_per_peer" in refused.value.details()
        with KVStoreClient(server.address, token=TOKEN, timeout=10) as other:
            assert other.health() == "SERVING"
            other.create_table("served", 4)
            assert other.lookup("served", np.array([1, 2])).shape == (2, 4)
    finally:
        for watch in watches:
            watch.cancel()
        channel.close()


def test_a_freed_watch_slot_can_be_taken_again(server):
    channel = grpc.insecure_channel(server.address)
    stub = health_pb2_grpc.HealthStub(channel)
    watches = [stub.Watch(health_pb2.HealthCheckRequest()) for _ in range(PER_PEER)]
    for watch in watches:
        next(watch)
    watches.pop().cancel()
    again = None
    for _ in range(50):        # the server sees the cancel a moment later: retry until the slot is free
        candidate = stub.Watch(health_pb2.HealthCheckRequest())
        try:
            next(candidate)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            continue
        again = candidate
        break
    assert again is not None, "the cancelled watch never released its slot"
    for watch in [*watches, again]:
        watch.cancel()
    channel.close()


def test_a_flood_of_refused_calls_logs_a_few_lines_naming_the_caller(server):
    before = server.log.read_text().count("refused ")
    with KVStoreClient(server.address, token="not-the-token-at-all", timeout=10) as intruder:
        for _ in range(40):
            with pytest.raises(UnauthenticatedError):
                intruder.list_tables()
    with KVStoreClient(server.address, token=TOKEN, timeout=10) as admin:
        admin.list_tables()                     # a call after the flood: the log is written by now
    lines = [line for line in server.log.read_text().splitlines() if "refused " in line][before:]
    assert 1 <= len(lines) <= 2, lines
    assert "127.0.0.1" in lines[0] and "ListTables" in lines[0]
    assert TOKEN not in server.log.read_text() and "not-the-token-at-all" not in server.log.read_text()


def test_refusal_log_keeps_one_line_per_address_per_interval():
    from kvstore_server.security import RefusalLog

    now = [0.0]
    refusals = RefusalLog(interval=10.0, clock=lambda: now[0])
    assert refusals.refused("ipv4:10.0.0.1:4000", "/m", "bad")
    assert not refusals.refused("ipv4:10.0.0.1:4001", "/m", "bad")       # same address, other port
    assert refusals.refused("ipv4:10.0.0.2:4000", "/m", "bad")           # another address
    now[0] = 10.0
    assert refusals.refused("ipv4:10.0.0.1:4002", "/m", "bad")
