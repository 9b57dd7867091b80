"""The buffered-request memory budget: streamed writes past `max_buffered_bytes_per_peer` (one
connection) or `max_buffered_bytes` (all calls) end RESOURCE_EXHAUSTED naming the option, apply
nothing, and give their bytes back however they end; other clients keep being served."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from kvstore_client import KVStoreClient, ResourceExhaustedError
from kvstore_proto.tensors import encode_ids, encode_tensor
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc

from .conftest import free_port, run_cli, scrape, value, wait_until

DIM = 256                       # 1 KiB rows
PER_PEER = 1_500_000
TOTAL = 2_000_000
HELD_ROWS = 1200                # about 1.2 MB: under the per-connection budget, two of them over the total
CHUNK_ROWS = 100


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--max-buffered-bytes", str(TOTAL), "--max-buffered-bytes-per-peer", str(PER_PEER),
                        metrics_port=free_port())


@pytest.fixture(scope="module")
def client(server):
    with KVStoreClient(server.address, timeout=60, chunk_bytes=128 << 10) as opened:
        opened.create_table("budgeted", DIM, cache={"rows": 256, "ways": 8})
        yield opened


def buffered(server) -> float:
    return value(scrape(server), "kvstore_buffered_request_bytes")


def rows(n: int, fill: float, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(start, start + n), np.full((n, DIM), fill, np.float32)


class HeldUpdate:
    """An Update on its own connection that sends `n` rows and then waits for `release` before its last
    chunk (or is cancelled): its bytes stay buffered on the server meanwhile."""

    def __init__(self, address: str, n: int, start: int):
        self.release = threading.Event()
        self.channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])  # own TCP
        ids, weights = rows(n, 7.0, start)
        self.chunks = [pb.UpdateRequest(table="budgeted", ids=encode_ids(ids[i:i + CHUNK_ROWS]),
                                        weights=encode_tensor(weights[i:i + CHUNK_ROWS]))
                       for i in range(0, n, CHUNK_ROWS)]
        self.call = pb_grpc.EmbeddingStoreStub(self.channel).Update.future(self._requests(), timeout=120)

    def _requests(self):
        yield from self.chunks[:-1]
        self.release.wait(120)
        last = self.chunks[-1]
        last.last = True
        yield last

    def close(self) -> None:
        self.release.set()
        self.channel.close()


def test_a_write_over_the_per_connection_budget_is_refused_naming_it_and_applies_nothing(server, client):
    ids, weights = rows(2000, 5.0)                    # 2 MB in 128 KiB chunks, on one connection
    with pytest.raises(ResourceExhaustedError) as refused:
        client.update("budgeted", ids, weights)
    assert refused.value.message.startswith("max_buffered_bytes_per_peer")
    assert not client.lookup("budgeted", ids, on_miss="zeros").any()
    assert wait_until(lambda: buffered(server) == 0)
    assert client.update("budgeted", *rows(1000, 3.0)) == 1000       # the bytes came back: a smaller write fits


def test_writes_over_the_server_budget_are_refused_while_others_are_served(server, client):
    held = HeldUpdate(server.address, HELD_ROWS, start=10_000)
    try:
        assert wait_until(lambda: buffered(server) >= HELD_ROWS * DIM * 4 * 0.9, 30)
        with KVStoreClient(server.address, timeout=60, chunk_bytes=128 << 10) as other:
            with pytest.raises(ResourceExhaustedError) as refused:
                other.update("budgeted", *rows(HELD_ROWS, 9.0, start=20_000))
            assert refused.value.message.startswith("max_buffered_bytes:")
            assert not other.lookup("budgeted", np.arange(20_000, 20_000 + HELD_ROWS), on_miss="zeros").any()
            assert other.update("budgeted", *rows(10, 2.0, start=30_000)) == 10     # a small write still fits
        held.release.set()
        assert held.call.result(timeout=60).rows == HELD_ROWS        # the held write completes and applies
    finally:
        held.close()
    assert wait_until(lambda: buffered(server) == 0)
    np.testing.assert_array_equal(client.lookup("budgeted", [10_000, 30_000]), [[7.0] * DIM, [2.0] * DIM])


def test_a_held_write_is_charged_the_bytes_it_sent(server, client):
    held = HeldUpdate(server.address, HELD_ROWS, start=60_000)
    try:
        sent = sum(len(chunk.SerializeToString()) for chunk in held.chunks[:-1])   # all but the held last chunk
        assert wait_until(lambda: buffered(server) == sent, 30)
        held.release.set()
        assert held.call.result(timeout=60).rows == HELD_ROWS
    finally:
        held.close()
    assert wait_until(lambda: buffered(server) == 0)


def test_a_cancelled_write_gives_its_bytes_back(server, client):
    held = HeldUpdate(server.address, HELD_ROWS, start=40_000)
    try:
        assert wait_until(lambda: buffered(server) >= HELD_ROWS * DIM * 4 * 0.9, 30)
        held.call.cancel()
        assert wait_until(lambda: buffered(server) == 0)
    finally:
        held.close()
    assert client.update("budgeted", *rows(HELD_ROWS, 4.0, start=50_000)) == HELD_ROWS   # the budget is free again
    assert not client.lookup("budgeted", [40_000], on_miss="zeros").any()               # nothing of the cancelled one


@pytest.mark.parametrize("option", ["max-buffered-bytes", "max-buffered-bytes-per-peer", "max-data-bytes",
                                    "default-max-rows"])
def test_a_negative_budget_is_refused_naming_the_option(option):
    result = run_cli("kvstore_server", f"--{option}", "-1", "--print-config")
    assert result.returncode == 2
    assert result.stderr.startswith(f"kvstore-server: {option.replace('-', '_')}: must be 0")


def test_the_budgets_are_printed_with_the_effective_config():
    printed = run_cli("kvstore_server", "--max-buffered-bytes", "1000", "--print-config").stdout
    assert 'max_buffered_bytes: 1000  # --max-buffered-bytes' in printed
    assert "max_data_bytes: 0  # default" in printed and "default_max_rows: 0  # default" in printed
