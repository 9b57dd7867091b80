"""Streamed writes are all-or-nothing and idempotent: a call cancelled after some chunks applies
nothing; a retry carrying the first try's idempotency key is answered without applying again."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from kvstore_client import DataLossError, NotFoundError
from kvstore_proto.export_format import ExportReader, ExportWriter
from kvstore_proto.tensors import encode_ids, encode_tensor
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc

from .conftest import TwoThenHold, small_table

DIM = 4
TRIES = 5
ROWS = np.arange(6)      # three chunks of two rows


def _chunks(method: str, table: str, key: str = "") -> list:
    """Three chunks of one streamed write of `method` over ROWS, the last one marked as the client does."""
    kind, values_field = {"Update": (pb.UpdateRequest, "weights"), "Delete": (pb.DeleteRequest, None),
                          "ApplyGradients": (pb.ApplyGradientsRequest, "grads"),
                          "Import": (pb.ImportRequest, "weights")}[method]
    out = []
    for start in range(0, len(ROWS), 2):
        values = {} if values_field is None else {values_field: encode_tensor(np.full((2, DIM), 9.0, np.float32))}
        out.append(kind(table=table, ids=encode_ids(ROWS[start:start + 2]), idempotency_key=key, **values))
    out[-1].last = True
    return out


@pytest.mark.parametrize("method", ["Update", "ApplyGradients", "Delete", "Import"])
def test_a_write_cancelled_after_two_of_three_chunks_applies_nothing(client, method):
    table = f"cancelled_{method.lower()}"
    small_table(client, table, DIM, optimizer={"name": "sgd", "lr": 1.0})
    client.update(table, ROWS[:3], np.ones((3, DIM), np.float32))      # Import/Update/Delete would change these
    before = client.lookup(table, ROWS, on_miss="zeros")
    stub = pb_grpc.EmbeddingStoreStub(client._channel)
    for attempt in range(TRIES):
        requests = TwoThenHold(_chunks(method, table, key=f"try-{attempt}"))
        call = getattr(stub, method).future(iter(requests), timeout=60)
        assert requests.asked_for_third.wait(30)
        call.cancel()
        requests.release.set()
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
        np.testing.assert_array_equal(client.lookup(table, ROWS, on_miss="zeros"), before)


def test_a_keyed_stream_that_ends_without_its_last_chunk_is_refused_and_changes_nothing(client):
    small_table(client, "unfinished", DIM)
    before = client.lookup("unfinished", ROWS)
    chunks = _chunks("Update", "unfinished", key="cut-short")[:2]          # the chunk marked last never came
    with pytest.raises(grpc.RpcError) as raised:
        pb_grpc.EmbeddingStoreStub(client._channel).Update(iter(chunks), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "last" in raised.value.details()
    np.testing.assert_array_equal(client.lookup("unfinished", ROWS), before)


def test_a_retry_with_the_same_key_is_answered_with_the_first_result_and_applied_once(client):
    small_table(client, "retried", DIM, optimizer={"name": "sgd", "lr": 1.0})
    before = client.lookup("retried", ROWS)
    stub = pb_grpc.EmbeddingStoreStub(client._channel)
    first = stub.ApplyGradients(iter(_chunks("ApplyGradients", "retried", key="step-1")), timeout=30)
    again = stub.ApplyGradients(iter(_chunks("ApplyGradients", "retried", key="step-1")), timeout=30)
    assert first.rows == again.rows == len(ROWS)
    np.testing.assert_allclose(client.lookup("retried", ROWS), before - 9.0, rtol=1e-6)     # one step only
    stub.ApplyGradients(iter(_chunks("ApplyGradients", "retried", key="step-2")), timeout=30)
    np.testing.assert_allclose(client.lookup("retried", ROWS), before - 18.0, rtol=1e-6)    # a new key steps


def test_a_retried_update_keeps_the_first_tries_rows(client):
    small_table(client, "retried_update", DIM)
    stub = pb_grpc.EmbeddingStoreStub(client._channel)
    ids = encode_ids(np.array([1]))
    for value in (1.0, 2.0):
        weights = encode_tensor(np.full((1, DIM), value, np.float32))
        stub.Update(iter([pb.UpdateRequest(table="retried_update", ids=ids, weights=weights,
                                           idempotency_key="same", last=True)]), timeout=30)
    np.testing.assert_array_equal(client.lookup("retried_update", [1], on_miss="error"), np.ones((1, DIM)))


def test_the_client_gives_every_streamed_write_its_own_key(client):
    small_table(client, "keyed", DIM, optimizer={"name": "sgd", "lr": 1.0})
    before = client.lookup("keyed", [1])
    for _ in range(3):                    # equal calls, different keys: each is applied
        client.apply_gradients("keyed", [1], np.ones((1, DIM), np.float32))
    np.testing.assert_allclose(client.lookup("keyed", [1]), before - 3.0, rtol=1e-6)


def test_importing_a_damaged_export_is_data_loss_naming_the_chunk_file_and_changes_nothing(client, tmp_path):
    path = tmp_path / "export"
    writer = ExportWriter(str(path), {"name": "damaged", "dim": DIM}, DIM, "float32", 0, file_bytes=64)
    for start in range(0, 6, 2):
        ids = np.arange(start, start + 2)
        writer.write(ids, np.ones((2, DIM), np.float32), np.zeros((2, 0), np.float32), np.zeros((2, 3), np.uint32))
    writer.close()
    chunk_files = sorted(p for p in path.iterdir() if p.name.startswith("chunk-"))
    assert len(chunk_files) >= 2
    damaged = chunk_files[-1]
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(DataLossError, match=damaged.name):
        client.import_chunks("damaged", ExportReader(str(path)), config={"name": "damaged", "dim": DIM})
    with pytest.raises(NotFoundError):                   # the table the import would have created is not there
        client.describe_table("damaged")


def test_recent_keys_are_bounded_and_expire():
    """The server remembers at most `capacity` keys, each for `seconds`: then a key runs anew."""
    import asyncio

    from kvstore_server.idempotency import RecentWrites

    now = [0.0]
    recent = RecentWrites(capacity=2, seconds=10.0, clock=lambda: now[0])
    applied: list[str] = []

    def write(key: str):
        async def commit():
            applied.append(key)
            return len(applied)
        return recent.once("Update", key, commit)

    async def scenario() -> None:
        assert await write("a") == 1 and await write("a") == 1         # a retry: the first result
        await write("b")
        await write("c")                                                # over capacity: "a" is dropped
        assert await write("a") == 4
        now[0] += 11.0                                                  # every key expired
        assert await write("c") == 5
        first, second = await asyncio.gather(write("d"), write("d"))   # concurrent tries: one commit
        assert first == second == 6

    asyncio.run(scenario())
    assert applied == ["a", "b", "c", "a", "c", "d"]
