"""Rows through the real server: round trips, chunking, on_miss modes, delete, stats."""
from __future__ import annotations

import numpy as np
import pytest
from kvstore_client import DeadlineExceededError, KVStoreClient, NotFoundError

from .conftest import random_rows, small_table


def test_large_batch_round_trips_through_chunking(server):
    # The client's message limit (4 MiB) is below the batch (10 MiB): only chunking gets it through.
    ids = np.arange(20_000, dtype=np.int64) * 7 - 50_000
    weights = random_rows(len(ids), 128, seed=1)
    with KVStoreClient(server.address, max_message_bytes=4 << 20, chunk_bytes=2 << 20) as client:
        client.create_table("big", 128, cache={"rows": 32768, "ways": 32})
        assert client.update("big", ids, weights) == len(ids)
        back = client.lookup("big", ids, on_miss="error")
    assert back.dtype == np.float32 and back.shape == weights.shape
    np.testing.assert_array_equal(back, weights)


def test_small_chunks_reassemble_in_request_order(client):
    small_table(client, "order", dim=4)
    ids = np.arange(1000, dtype=np.int64)[::-1].copy()
    weights = random_rows(len(ids), 4, seed=2)
    client.update("order", ids, weights)
    with KVStoreClient(client.address, chunk_bytes=256) as tiny:   # many chunks each way
        np.testing.assert_array_equal(tiny.lookup("order", ids, on_miss="error"), weights)
        assert tiny.update("order", ids, weights + 1) == len(ids)
    np.testing.assert_array_equal(client.lookup("order", ids), weights + 1)


def test_duplicates_come_back_in_request_order(client):
    small_table(client, "dups", dim=4)
    ids = np.array([5, 9, 5, 5, -3, 9], dtype=np.int64)
    rows = {5: 1.0, 9: 2.0, -3: 3.0}
    unique = np.array(list(rows), dtype=np.int64)
    client.update("dups", unique, np.repeat(np.array(list(rows.values()), np.float32)[:, None], 4, axis=1))
    back = client.lookup("dups", ids, on_miss="error")
    np.testing.assert_array_equal(back[:, 0], [rows[i] for i in ids.tolist()])


def test_update_last_write_wins_within_a_batch(client):
    small_table(client, "lww", dim=2)
    ids = np.array([1, 1, 2], dtype=np.int64)
    weights = np.array([[1, 1], [2, 2], [3, 3]], dtype=np.float32)
    client.update("lww", ids, weights)
    np.testing.assert_array_equal(client.lookup("lww", [1, 2], on_miss="error"), [[2, 2], [3, 3]])


def test_init_insert_stores_the_initialized_row(client):
    small_table(client, "miss_insert")
    first = client.lookup("miss_insert", [11, 12], on_miss="init_insert")
    assert np.abs(first).sum() > 0                     # initialized, not zeros
    np.testing.assert_array_equal(client.lookup("miss_insert", [12, 11], on_miss="error"), first[::-1])


def test_init_returns_the_initial_row_without_storing_it(client):
    small_table(client, "miss_init")
    first = client.lookup("miss_init", [21], on_miss="init")
    assert np.abs(first).sum() > 0
    np.testing.assert_array_equal(client.lookup("miss_init", [21], on_miss="init"), first)
    with pytest.raises(NotFoundError) as caught:
        client.lookup("miss_init", [21], on_miss="error")
    assert caught.value.reason == "row_not_found" and "ids" in caught.value.message


def test_zeros_returns_zeros_without_storing(client):
    small_table(client, "miss_zeros")
    np.testing.assert_array_equal(client.lookup("miss_zeros", [31, 32], on_miss="zeros"), np.zeros((2, 8)))
    with pytest.raises(NotFoundError):
        client.lookup("miss_zeros", [31], on_miss="error")


def test_error_on_a_missing_id_is_not_found_and_names_ids(client):
    small_table(client, "miss_error")
    client.update("miss_error", [1], np.ones((1, 8), np.float32))
    with pytest.raises(NotFoundError) as caught:
        client.lookup("miss_error", [1, 999], on_miss="error")
    assert "ids" in caught.value.message
    np.testing.assert_array_equal(client.lookup("miss_error", [1], on_miss="error"), np.ones((1, 8)))


def test_deterministic_init_across_tables_with_the_same_seed(client):
    for name, seed in (("seed_a", 7), ("seed_b", 7), ("seed_c", 8)):
        small_table(client, name, initializer={"kind": "normal", "scale": 0.5, "seed": seed})
    ids = np.array([3, -4, 1 << 40], dtype=np.int64)
    a = client.lookup("seed_a", ids, on_miss="init")
    np.testing.assert_array_equal(client.lookup("seed_b", ids, on_miss="init_insert"), a)
    assert not np.array_equal(client.lookup("seed_c", ids, on_miss="init"), a)


def test_delete_removes_rows(client):
    small_table(client, "del")
    client.update("del", [1, 2, 3], random_rows(3, 8))
    assert client.delete("del", [2, 3, 2]) == 2
    with pytest.raises(NotFoundError):
        client.lookup("del", [2], on_miss="error")
    with pytest.raises(NotFoundError):
        client.lookup("del", [3], on_miss="error")
    assert client.lookup("del", [1], on_miss="error").shape == (1, 8)


def test_lookup_with_state_returns_the_optimizer_state(client):
    small_table(client, "adam", dim=4, optimizer={"name": "adam"})
    state = np.arange(16, dtype=np.float32).reshape(2, 8)
    client.update("adam", [1, 2], np.ones((2, 4), np.float32), state=state)
    weights, back = client.lookup("adam", [2, 1], on_miss="error", with_state=True)
    np.testing.assert_array_equal(back, state[::-1])
    np.testing.assert_array_equal(weights, np.ones((2, 4)))


def test_empty_batches_are_fine(client):
    small_table(client, "empty", dim=3)
    assert client.lookup("empty", np.array([], np.int64)).shape == (0, 3)
    assert client.update("empty", np.array([], np.int64), np.zeros((0, 3), np.float32)) == 0
    assert client.delete("empty", []) == 0


def test_stats_counters_move(client):
    small_table(client, "counted")
    before = client.stats("counted")
    client.update("counted", [1, 2], random_rows(2, 8))
    client.lookup("counted", [1, 2, 3])
    after = client.stats("counted")
    moved = {key: after.get(key, 0) - before.get(key, 0) for key in ("rows_updated", "cache_hits", "cache_misses")}
    assert moved["rows_updated"] == 2
    assert moved["cache_hits"] + moved["cache_misses"] == 3     # every looked-up id is one or the other
    assert moved["cache_misses"] >= 1                           # id 3 was never written


def test_every_call_has_a_deadline(server, client):
    small_table(client, "slow", dim=64)
    ids = np.arange(200_000, dtype=np.int64)    # initializing 200k rows takes far longer than 1 ms
    with KVStoreClient(server.address, timeout=1e-3) as hurried:
        with pytest.raises(DeadlineExceededError):
            hurried.lookup("slow", ids, on_miss="init")
    assert client.list_tables()                  # the server carries on


def test_torch_in_torch_out(client):
    torch = pytest.importorskip("torch")
    small_table(client, "torchy", dim=4, dtype="bfloat16")
    weights = torch.randn(3, 4).to(torch.bfloat16)
    client.update("torchy", torch.tensor([1, 2, 3]), weights)
    back = client.lookup("torchy", torch.tensor([3, 1]), on_miss="error")
    assert isinstance(back, torch.Tensor) and back.dtype == torch.bfloat16
    assert torch.equal(back, weights[[2, 0]])


def test_concurrent_clients_each_read_their_own_writes(server, client):
    from concurrent.futures import ThreadPoolExecutor

    def worker(index: int) -> bool:
        name = f"par_{index}"
        rows = random_rows(500, 16, seed=index)
        with KVStoreClient(server.address, chunk_bytes=4096) as own:
            small_table(own, name, dim=16)
            own.update(name, np.arange(500), rows)
            return np.array_equal(own.lookup(name, np.arange(500)[::-1], on_miss="error"), rows[::-1])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(worker, range(4)))
