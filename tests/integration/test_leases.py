"""Prefetch locks are held by leases: renewed by use or KeepAlive, released when they lapse,
and no lease holder or open stream can stall an unrelated call."""
from __future__ import annotations

import threading
import urllib.request

import grpc
import numpy as np
import pytest
from kvstore_client import KVStoreClient
from kvstore_proto.tensors import encode_ids
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore_server.leases import Leases

from kvstore.errors import FailedPrecondition

from .conftest import free_port, small_table, wait_until

DIM = 4
HOLDERS = 16


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def expired_leases(server) -> float:
    """kvstore_leases_expired_total as the server exposes it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("kvstore_leases_expired_total "):
                return float(line.split()[1])
    return 0.0


def test_a_lease_lives_while_renewed_and_lapses_a_ttl_after_its_last_use():
    clock = FakeClock()
    leases = Leases(10.0, clock)
    lease = leases.grant()
    for _ in range(5):
        clock.now += 9.0
        leases.renew(lease)                   # used in time: lives on
    assert leases.expire() == [] and leases.is_live(lease)
    clock.now += 10.0
    assert leases.expire() == [lease] and leases.expired_total == 1
    with pytest.raises(FailedPrecondition, match="owner"):
        leases.renew(lease)


def test_an_unrenewed_lease_releases_its_rows_and_is_counted(start_server):
    server = start_server("--lease-seconds", "0.3", metrics_port=free_port())
    with KVStoreClient(server.address) as client:
        small_table(client, "lapsing", DIM)
        stub = pb_grpc.EmbeddingStoreStub(client._channel)
        lease = stub.GrantLease(pb.GrantLeaseRequest(), timeout=10).lease
        request = pb.PrefetchRequest(table="lapsing", ids=encode_ids(np.arange(3)), lock=True, owner=lease)
        assert stub.Prefetch(iter([request]), timeout=10).cached == 3       # nobody renews it from here
        assert wait_until(lambda: client.stats("lapsing")["cache_locked_rows"] == 0, timeout=60)
        assert wait_until(lambda: expired_leases(server) == 1, timeout=60)
        with pytest.raises(grpc.RpcError) as raised:
            stub.KeepAlive(pb.KeepAliveRequest(lease=lease), timeout=10)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "lease" in raised.value.details()


def test_a_closed_client_gives_its_lease_back_at_once(server, client):
    small_table(client, "revoked", DIM)
    with KVStoreClient(server.address) as holder:
        holder.prefetch("revoked", np.arange(4), lock=True)
        assert client.stats("revoked")["cache_locked_rows"] == 4
    assert client.stats("revoked")["cache_locked_rows"] == 0       # RevokeLease ran in close()


def _held_lookup(stub, table: str, answered: threading.Barrier, release: threading.Event):
    """A Lookup stream that sends one chunk, then stays open until `release`."""
    def requests():
        yield pb.LookupRequest(table=table, ids=encode_ids(np.array([1])))
        release.wait(120)

    call = stub.Lookup(requests(), timeout=120)
    next(call)
    answered.wait(60)
    return call


def test_lease_holders_and_open_streams_do_not_stall_a_lookup_or_health(start_server):
    """16 clients holding locks and 16 open streams on a server with 2 store threads: a lookup of
    another table and a health check are still answered."""
    server = start_server("--max-workers", "2")
    release = threading.Event()
    answered = threading.Barrier(HOLDERS + 1)
    holders = [KVStoreClient(server.address) for _ in range(HOLDERS)]
    channel = grpc.insecure_channel(server.address)
    streams = []
    try:
        small_table(holders[0], "pinned_by_many", DIM)
        small_table(holders[0], "unrelated", DIM)
        for index, holder in enumerate(holders):
            assert holder.prefetch("pinned_by_many", [index], lock=True) == 1
        stub = pb_grpc.EmbeddingStoreStub(channel)
        opener = [threading.Thread(target=lambda: streams.append(_held_lookup(stub, "pinned_by_many", answered,
                                                                               release)))
                  for _ in range(HOLDERS)]
        for thread in opener:
            thread.start()
        answered.wait(60)                                  # every stream is open and has been answered
        with KVStoreClient(server.address, timeout=30) as outsider:
            assert outsider.lookup("unrelated", [7, 8]).shape == (2, DIM)
            assert outsider.health() == "SERVING"
            assert outsider.stats("pinned_by_many")["cache_locked_rows"] == HOLDERS
        for thread in opener:
            thread.join(60)
    finally:
        release.set()
        for call in streams:
            list(call)
        channel.close()
        for holder in holders:
            holder.close()
