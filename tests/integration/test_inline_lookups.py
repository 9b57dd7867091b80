"""Lookups and training steps of cached rows served on the event loop (`inline_lookup_bytes`) never
make the loop wait.

These tests run `KVStoreServer` (what `kvstore-server` runs: real gRPC on a loopback port, real
Store and RocksDB) on an event loop thread of the test process rather than in a child process,
because they hand the store a clock they can stop inside (`HeldClock`: a lookup stopped there
holds its table's lock for as long as the test wants) and count the jobs that reach the store
threads. Everything is ordered by events; nothing sleeps.
"""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from held_clock import HeldClock
from kvstore_client import KVStoreClient
from kvstore_client.training_stream import TrainingStream
from kvstore_server.config import ServerConfig
from kvstore_server.data_budget import DataBudget
from kvstore_server.rpc import StoreWork
from kvstore_server.server import KVStoreServer

from kvstore import CacheConfig, SweeperConfig
from kvstore.cache import SetAssociativeCache

from .conftest import random_rows

DIM = 8                                  # float32: 32 bytes of weights per row
WRITE_THROUGH = {"rows": 256, "ways": 8, "write": "write_through"}   # no dirty rows: no flush takes the lock


class CountedWork(StoreWork):
    """The server's store threads, counting the jobs that calls hand them (not the data budget's
    reading of the database size, which the server runs every second whatever the calls)."""

    def __init__(self, workers: int):
        super().__init__(workers)
        self.jobs = 0
        self._counted = threading.Condition()

    async def __call__(self, fn, *args):
        if getattr(fn, "__func__", None) is not DataBudget.refresh:
            with self._counted:
                self.jobs += 1
                self._counted.notify_all()
        return await super().__call__(fn, *args)

    def wait_for(self, jobs: int) -> bool:
        with self._counted:
            return self._counted.wait_for(lambda: self.jobs >= jobs, 60)


class LoopServer:
    """A KVStoreServer on its own event loop thread, with the store clock and the store threads given."""

    def __init__(self, data_dir, clock, **settings):
        config = ServerConfig(data_dir=str(data_dir), port=0, sweeper=SweeperConfig(enabled=False), **settings)
        self.server = KVStoreServer(config, store_clock=clock)
        self.work = self.server.work = CountedWork(4)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        self.address = f"127.0.0.1:{self._run(self.server.start())}"

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def stop(self) -> None:
        self._run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(60)
        self.loop.close()


@pytest.fixture
def start_loop_server(tmp_path):
    started = []

    def start(clock=None, **settings) -> LoopServer:
        server = LoopServer(tmp_path / f"data{len(started)}", clock or HeldClock(), **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _table(client: KVStoreClient, name: str, rows: int = 16) -> np.ndarray:
    client.create_table(name, DIM, cache=WRITE_THROUGH)
    weights = random_rows(rows, DIM, seed=len(name))
    client.update(name, np.arange(rows), weights)
    return weights


def test_a_lookup_waiting_for_a_busy_table_leaves_health_and_other_tables_answering(start_loop_server):
    """One lookup holds table `busy` (stopped inside its lock); a lookup of cached rows of `busy`, which
    would be served on the loop were the table free, goes to a store thread instead of waiting on
    the loop: health and a lookup of another table are answered meanwhile, and both lookups finish
    with the right rows once the table is free."""
    clock = HeldClock()
    server = start_loop_server(clock)
    results = {}
    with KVStoreClient(server.address, timeout=60) as client:
        busy, free = _table(client, "busy"), _table(client, "free")
        jobs = server.work.jobs
        clock.arm(lambda thread: thread.name.startswith("kvstore-store"))
        holder = threading.Thread(target=lambda: results.update(holder=client.lookup("busy", [1000])))
        waiter = threading.Thread(target=lambda: results.update(waiter=client.lookup("busy", [1, 2])))
        holder.start()
        try:
            assert clock.holding.wait(60)                  # a miss went to a store thread and holds `busy`
            waiter.start()
            assert server.work.wait_for(jobs + 2)         # the cached lookup was handed off, not run or waited on
            assert client.health() == "SERVING"
            np.testing.assert_array_equal(client.lookup("free", [3, 4]), free[[3, 4]])
            assert waiter.is_alive() and holder.is_alive()
        finally:
            clock.release()
            holder.join(60)
            waiter.join(60)
    np.testing.assert_array_equal(results["waiter"], busy[[1, 2]])
    assert results["holder"].shape == (1, DIM)


def test_cached_rows_up_to_the_bound_are_served_without_a_store_thread(start_loop_server):
    server = start_loop_server(inline_lookup_bytes=10 * DIM * 4)      # ten rows of weights
    with KVStoreClient(server.address, timeout=60) as client:
        weights = _table(client, "t", rows=32)
        jobs = server.work.jobs
        np.testing.assert_array_equal(client.lookup("t", np.arange(10)), weights[:10])
        assert server.work.jobs == jobs                    # served on the loop
        np.testing.assert_array_equal(client.lookup("t", np.arange(11)), weights[:11])
        assert server.work.jobs == jobs + 1                # over the bound: a store thread
        client.lookup("t", [5, 100])
        assert server.work.jobs == jobs + 2                # a miss reads RocksDB: a store thread


def test_rows_of_a_set_with_more_rows_than_ways_stay_cached_and_are_served_on_the_loop(start_loop_server):
    """Twelve ids of one set of a two-set cache of 8 ways: four spill into the other set, so every
    row stays cached and a lookup of all twelve needs no store thread and reads no RocksDB."""
    server = start_loop_server()
    cache = {"rows": 16, "ways": 8, "write": "write_through"}
    sets = SetAssociativeCache(CacheConfig(rows=16, ways=8), 16).set_of(np.arange(200, dtype=np.int64))
    ids = np.flatnonzero(sets == 0)[:12]
    with KVStoreClient(server.address, timeout=60) as client:
        client.create_table("t", DIM, cache=cache)
        weights = random_rows(len(ids), DIM, seed=3)
        client.update("t", ids, weights)
        misses = client.stats("t").get("cache_misses", 0)
        jobs = server.work.jobs
        for _ in range(3):
            np.testing.assert_array_equal(client.lookup("t", ids), weights)
        assert server.work.jobs == jobs                    # served on the loop, every time
        assert client.stats("t").get("cache_misses", 0) == misses


def test_inline_lookup_bytes_0_sends_every_lookup_to_the_store_threads(start_loop_server):
    server = start_loop_server(inline_lookup_bytes=0)
    with KVStoreClient(server.address, timeout=60) as client:
        weights = _table(client, "t")
        jobs = server.work.jobs
        np.testing.assert_array_equal(client.lookup("t", [1, 2]), weights[[1, 2]])
        assert server.work.jobs == jobs + 1


def test_a_same_host_lookup_past_the_bound_is_one_store_job_written_into_the_segment(start_loop_server, monkeypatch):
    """Over gRPC, cached rows past the bound are gathered into the client's segment by one store
    job; a batch with misses is looked up there a piece at a time (pieces of four rows here)."""
    import kvstore_server.same_host_service as same_host_service

    monkeypatch.setattr(same_host_service, "STORE_PIECE_BYTES", 4 * DIM * 4)
    server = start_loop_server(inline_lookup_bytes=10 * DIM * 4)
    with KVStoreClient(server.address, timeout=60, same_host=True) as shm, KVStoreClient(server.address) as net:
        weights = _table(net, "t", rows=32)
        jobs = server.work.jobs
        np.testing.assert_array_equal(shm.lookup("t", np.arange(10)), weights[:10])
        assert server.work.jobs == jobs and shm.same_host.active       # on the loop, through the segment
        shm.same_host.doorbell.close()
        shm.same_host.doorbell = None                                  # SharedLookup over gRPC from here
        np.testing.assert_array_equal(shm.lookup("t", np.arange(32)[::-1]), weights[::-1])
        assert server.work.jobs == jobs + 1
        ids = np.array([3, 100, 5, 101, 7, 102, 9, 3, 100, 31, 103])     # misses in three pieces, repeats
        got = shm.lookup("t", ids)
        assert server.work.jobs == jobs + 2
        np.testing.assert_array_equal(got[[0, 2, 4, 6, 7, 9]], weights[[3, 5, 7, 9, 3, 31]])
        np.testing.assert_array_equal(got, net.lookup("t", ids, on_miss="error"))   # the new rows were kept


def test_the_doorbell_gathers_cached_rows_of_any_size_in_its_own_thread(start_loop_server, monkeypatch):
    """Over the doorbell, cached rows past the bound are gathered into the segment by the
    connection's thread, a piece at a time: no store job; a batch with misses goes to the loop's
    SharedLookup, whose store job reads them, and the rows equal the network path's."""
    import kvstore_server.same_host_service as same_host_service

    monkeypatch.setattr(same_host_service, "STORE_PIECE_BYTES", 4 * DIM * 4)
    server = start_loop_server(inline_lookup_bytes=10 * DIM * 4)
    with KVStoreClient(server.address, timeout=60, same_host=True) as shm, KVStoreClient(server.address) as net:
        weights = _table(net, "t", rows=32)
        jobs = server.work.jobs
        np.testing.assert_array_equal(shm.lookup("t", np.arange(32)[::-1]), weights[::-1])    # eight pieces
        assert shm.same_host.doorbell is not None and server.work.jobs == jobs
        ids = np.array([3, 100, 5, 101, 7, 102, 9, 3, 100, 31, 103])
        got = shm.lookup("t", ids)
        assert server.work.jobs > jobs
        np.testing.assert_array_equal(got[[0, 2, 4, 6, 7, 9]], weights[[3, 5, 7, 9, 3, 31]])
        np.testing.assert_array_equal(got, net.lookup("t", ids, on_miss="error"))   # the new rows were kept


SGD = {"name": "sgd", "lr": 0.5}
WRITE_BACK = {"rows": 256, "ways": 8, "flush_seconds": 3600}   # the writer takes no lock during a test


def _trained(client: KVStoreClient, name: str, rows: int = 16) -> np.ndarray:
    client.create_table(name, DIM, cache=WRITE_BACK, optimizer=SGD)
    weights = random_rows(rows, DIM, seed=len(name))
    client.update(name, np.arange(rows), weights)
    return weights


def _sgd(weights: np.ndarray, ids: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """weights after one SGD step of `grads` (duplicates summed in order, float32, as the server does)."""
    stepped = weights.copy()
    for i in np.unique(ids):
        total = np.zeros(DIM, np.float32)
        for row in grads[ids == i]:
            total = total + row
        stepped[i] = stepped[i] - total * np.float32(SGD["lr"])
    return stepped


@pytest.mark.parametrize("same_host", [False, True])
def test_a_training_step_of_cached_rows_runs_on_the_loop_and_others_in_store_threads(start_loop_server, same_host):
    """A step (gradients, then lookups) of cached rows of write_back tables, within the bound, needs no
    store thread, its rows in the answer or (same_host) written into the client's segment; one past
    the bound, and one with a row not cached, each take one store job. Every step's lookups see its
    own gradients."""
    server = start_loop_server(inline_lookup_bytes=12 * DIM * 4)
    rng = np.random.default_rng(7)
    with KVStoreClient(server.address, timeout=60, same_host=same_host) as client, TrainingStream(client) as stream:
        a, b = _trained(client, "a"), _trained(client, "bb")
        assert client.same_host.usable() == same_host
        jobs = server.work.jobs
        ids = np.array([1, 3, 1])
        grads = rng.standard_normal((3, DIM)).astype(np.float32)
        stepped, rows = stream.send(gradients={"a": (ids, grads), "bb": (ids, grads)},
                                    lookups={"a": [1, 2], "bb": [3]}).result()
        a, b = _sgd(a, ids, grads), _sgd(b, ids, grads)
        assert stepped == {"a": 2, "bb": 2} and server.work.jobs == jobs      # on the loop
        np.testing.assert_array_equal(rows["a"], a[[1, 2]])
        np.testing.assert_array_equal(rows["bb"], b[[3]])
        big = np.arange(13)
        stepped, rows = stream.send(lookups={"a": big}).result()
        assert server.work.jobs == jobs + 1                                    # past the bound
        np.testing.assert_array_equal(rows["a"], a[big])
        stepped, rows = stream.send(gradients={"a": (ids, grads)}, lookups={"a": [1, 100]}).result()
        a = _sgd(a, ids, grads)
        assert server.work.jobs == jobs + 2                                    # 100 is not cached
        np.testing.assert_array_equal(rows["a"][0], a[1])


def test_a_step_whose_second_table_is_busy_goes_on_in_a_store_thread_from_where_it_stopped(start_loop_server):
    """Table `a` is free and `busy` is held by a lookup stopped inside its lock: a step of both steps `a`
    on the loop (a lookup of `a` sees it while the step waits), then goes to a store thread for `busy`;
    once `busy` is free it finishes there, each table stepped once, its answer with the stepped rows."""
    clock = HeldClock()
    server = start_loop_server(clock)
    rng = np.random.default_rng(8)
    results = {}
    with KVStoreClient(server.address, timeout=60) as client, TrainingStream(client) as stream:
        a, busy = _trained(client, "a"), _trained(client, "busy")
        ids = np.array([2, 5, 2])
        grads = rng.standard_normal((3, DIM)).astype(np.float32)
        jobs = server.work.jobs
        clock.arm(lambda thread: thread.name.startswith("kvstore-store"))
        holder = threading.Thread(target=lambda: results.update(holder=client.lookup("busy", [1000])))
        holder.start()
        try:
            assert clock.holding.wait(60)                  # a miss went to a store thread and holds `busy`
            step = stream.send(gradients={"a": (ids, grads), "busy": (ids, grads)}, lookups={"a": ids, "busy": ids})
            assert server.work.wait_for(jobs + 2)          # the step went to a store thread, after `a` ...
            np.testing.assert_array_equal(client.lookup("a", ids), _sgd(a, ids, grads)[ids])   # ... was stepped
            assert not step.done
        finally:
            clock.release()
            holder.join(60)
        stepped, rows = step.result()
    assert stepped == {"a": 2, "busy": 2}
    np.testing.assert_array_equal(rows["a"], _sgd(a, ids, grads)[ids])            # stepped once, not twice
    np.testing.assert_array_equal(rows["busy"], _sgd(busy, ids, grads)[ids])


def test_an_apply_gradients_call_of_cached_rows_steps_them_on_the_loop(start_loop_server):
    server = start_loop_server(inline_lookup_bytes=12 * DIM * 4)
    rng = np.random.default_rng(9)
    with KVStoreClient(server.address, timeout=60) as client:
        weights = _trained(client, "t")
        jobs = server.work.jobs
        ids = np.array([4, 0, 4])
        grads = rng.standard_normal((3, DIM)).astype(np.float32)
        assert client.apply_gradients("t", ids, grads) == 2
        weights = _sgd(weights, ids, grads)
        assert server.work.jobs == jobs                                        # on the loop
        assert client.apply_gradients("t", [4, 200], grads[:2]) == 2          # 200 is not cached
        assert server.work.jobs == jobs + 1
        weights = _sgd(weights, np.array([4]), grads[:1])
        np.testing.assert_array_equal(client.lookup("t", np.arange(16), on_miss="error"), weights)
