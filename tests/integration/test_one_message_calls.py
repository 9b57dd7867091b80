"""Calls of one chunk go to the server as unary calls: the same messages on the wire, no
thread started per call (the Python client starts one per streamed call to send its requests)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from kvstore_client import KVStoreClient, NotFoundError

from .conftest import random_rows, small_table

DIM = 8


class ThreadStarts:
    """Counts the threads this process starts while in the block."""

    def __init__(self, monkeypatch):
        self.count = 0
        start = threading.Thread.start

        def counted(thread):
            self.count += 1
            return start(thread)

        monkeypatch.setattr(threading.Thread, "start", counted)


def test_one_chunk_lookups_and_writes_start_no_thread_and_keep_their_results(server, monkeypatch):
    with KVStoreClient(server.address) as client:
        small_table(client, "one_message", DIM, optimizer={"name": "sgd", "lr": 1.0})
        client.lookup("one_message", [0])                      # the channel's own threads start once
        starts = ThreadStarts(monkeypatch)
        rows = random_rows(4, DIM)
        assert client.update("one_message", [1, 2, 3, 4], rows) == 4
        np.testing.assert_array_equal(client.lookup("one_message", [4, 1], on_miss="error"), rows[[3, 0]])
        assert client.apply_gradients("one_message", [1, 1, 2], np.ones((3, DIM), np.float32)) == 2
        np.testing.assert_allclose(client.lookup("one_message", [1, 2], on_miss="error"),
                                   rows[:2] - np.array([[2.0], [1.0]], np.float32), rtol=1e-6)
        assert client.delete("one_message", [3]) == 1
        assert starts.count == 0
        with pytest.raises(NotFoundError, match="not found"):   # errors of unary calls map as the streams' do
            client.lookup("one_message", [3], on_miss="error")


def test_lookups_and_writes_of_several_chunks_still_stream_in_order(server):
    with KVStoreClient(server.address, chunk_bytes=DIM * 4 * 3) as client:    # three rows a chunk
        small_table(client, "many_messages", DIM)
        ids = np.arange(10)
        rows = random_rows(10, DIM, seed=1)
        assert client.update("many_messages", ids, rows) == 10
        np.testing.assert_array_equal(client.lookup("many_messages", ids[::-1], on_miss="error"), rows[::-1])
        assert client.delete("many_messages", ids[:7]) == 7
        np.testing.assert_array_equal(client.lookup("many_messages", ids, on_miss="zeros")[:7], 0.0)
