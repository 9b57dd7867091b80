"""Snapshots, export and import through a real server and client."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from kvstore_client import (
    AlreadyExistsError,
    InvalidArgumentError,
    KVStoreClient,
    NotFoundError,
)

from .conftest import random_rows, small_table


def test_snapshot_lifecycle_and_restore(client):
    small_table(client, "snap_a")
    ids = np.arange(300)
    client.update("snap_a", ids, np.ones((300, 8), np.float32))
    info = client.create_snapshot("life-1")
    assert info["name"] == "life-1" and info["pause_seconds"] <= info["duration_seconds"]
    assert "snap_a" in [t["name"] for t in info["tables"]]
    client.update("snap_a", ids, np.full((300, 8), 2.0, np.float32))
    client.restore_snapshot("life-1")
    assert (client.lookup("snap_a", ids, on_miss="error") == 1.0).all()
    assert "life-1" in [s["name"] for s in client.list_snapshots()]
    client.delete_snapshot("life-1")
    assert "life-1" not in [s["name"] for s in client.list_snapshots()]


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", ""])
def test_bad_snapshot_names_are_invalid_argument(client, name):
    for call in (client.create_snapshot, client.restore_snapshot, client.delete_snapshot):
        with pytest.raises(InvalidArgumentError, match="name"):
            call(name)


def test_existing_and_unknown_snapshot_names(client):
    client.create_snapshot("twice")
    with pytest.raises(AlreadyExistsError, match="name"):
        client.create_snapshot("twice")
    with pytest.raises(NotFoundError, match="name"):
        client.restore_snapshot("never-made")


def test_restore_while_clients_read_gives_no_errors(client, server):
    small_table(client, "snap_live")
    ids = np.arange(200)
    client.update("snap_live", ids, np.ones((200, 8), np.float32))
    client.create_snapshot("live-1")
    client.update("snap_live", ids, np.full((200, 8), 2.0, np.float32))
    errors, stop = [], threading.Event()

    def read() -> None:
        with KVStoreClient(server.address) as reader:
            while not stop.is_set():
                try:
                    values = np.unique(reader.lookup("snap_live", ids, on_miss="error"))
                    assert values.tolist() in ([1.0], [2.0])
                except Exception as exc:  # noqa: BLE001 - any error fails the test
                    errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for r in readers:
        r.start()
    client.restore_snapshot("live-1")
    after = client.lookup("snap_live", ids, on_miss="error")
    stop.set()
    for r in readers:
        r.join()
    assert not errors and (after == 1.0).all()


def test_export_import_round_trip_is_bit_exact_with_optimizer_state(client):
    small_table(client, "exp_src", dtype="bfloat16", optimizer={"name": "adam"})
    ids = np.arange(-2000, 3000, 3)
    weights = random_rows(len(ids), 8, "bfloat16")
    state = np.random.default_rng(1).random((len(ids), 16)).astype(np.float32)
    client.update("exp_src", ids, weights, state)
    stream = client.export("exp_src", chunk_rows=128)
    assert stream.config["dtype"] == "bfloat16" and stream.state_dim == 16
    chunks = list(stream)
    assert len(chunks) == -(-len(ids) // 128)
    got = client.export_table("exp_src")
    assert (got.ids == ids).all() and got.weights.tobytes() == weights.tobytes()
    assert got.state.tobytes() == state.tobytes()
    rows = client.import_chunks("exp_copy", chunks, mode="replace", config=stream.config)
    assert rows == len(ids)
    copy = client.export_table("exp_copy")
    for field in ("ids", "weights", "state", "meta"):
        assert getattr(copy, field).tobytes() == getattr(got, field).tobytes(), field


def test_import_table_sorts_merges_and_replaces(client):
    small_table(client, "imp")
    client.update("imp", [1, 2], np.ones((2, 8), np.float32))
    client.import_table("imp", [9, 3, 9], np.arange(24, dtype=np.float32).reshape(3, 8))
    got = client.export_table("imp")
    assert got.ids.tolist() == [1, 2, 3, 9] and got.weights[3, 0] == 16.0      # last 9 wins
    client.import_table("imp", [5], np.zeros((1, 8), np.float32), mode="replace")
    assert client.export_table("imp").ids.tolist() == [5]


def test_bad_import_chunk_changes_nothing_and_creates_nothing(client):
    small_table(client, "imp_bad")
    client.update("imp_bad", [1], np.ones((1, 8), np.float32))
    good = (np.arange(10), np.ones((10, 8), np.float32))
    bad = (np.arange(10, 12), np.ones((2, 5), np.float32))
    with pytest.raises(InvalidArgumentError, match="weights"):
        client.import_chunks("imp_bad", [good, bad], mode="replace")
    assert client.export_table("imp_bad").ids.tolist() == [1]
    config = client.describe_table("imp_bad")
    with pytest.raises(InvalidArgumentError, match="weights"):
        client.import_chunks("imp_new", [good, bad], config=config)
    assert "imp_new" not in client.list_tables()


def test_export_errors_have_their_codes(client):
    with pytest.raises(NotFoundError, match="table"):
        list(client.export("no_such_table"))
    small_table(client, "exp_err")
    with pytest.raises(InvalidArgumentError, match="chunk_rows"):
        list(client.export("exp_err", chunk_rows=-1))
    empty = client.export("exp_err")
    assert list(empty) == [] and empty.state_dim == 0


def test_snapshots_survive_a_server_restart(start_server):
    server = start_server()
    with KVStoreClient(server.address) as c:
        small_table(c, "t")
        c.update("t", [7], np.full((1, 8), 3.0, np.float32))
        c.create_snapshot("kept")
        c.update("t", [7], np.zeros((1, 8), np.float32))
        c.restore_snapshot("kept")
    server.restart()
    with KVStoreClient(server.address) as c:
        assert [s["name"] for s in c.list_snapshots()] == ["kept"]
        assert (c.lookup("t", [7], on_miss="error") == 3.0).all()
