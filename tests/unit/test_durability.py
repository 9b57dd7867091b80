"""The store's write promises, in process: background flushes, one writer, table incarnations,
atomic calls, and the state that belongs to `Table` alone."""
from __future__ import annotations

import ast
import threading
from pathlib import Path

import numpy as np
import pytest

import kvstore
from kvstore import RocksConfig, Store
from kvstore.config import EvictionConfig, OptimizerConfig
from kvstore.errors import InvalidArgument, ResourceExhausted, RowNotFound
from kvstore.rocks_tier import RocksTier
from kvstore.writer import WriteJob

from .conftest import stored_weights, table_config
from .test_eviction_concurrency import wait_for


def test_write_back_rows_reach_rocksdb_without_a_flush_call(store):
    store.create_table(table_config(rows=256, ways=32, flush_seconds=0.05))
    ids = np.arange(100)
    weights = np.full((100, 8), 3.0, np.float32)
    store.update("t", ids, weights)
    assert wait_for(lambda: store.stats("t")["cache_dirty_rows"] == 0 and store.stats("t")["pending_rows"] == 0)
    np.testing.assert_array_equal(np.stack(stored_weights(store, "t", ids)), weights)


@pytest.mark.parametrize("durability", ["none", "wal"])
def test_a_dropped_table_never_comes_back_under_its_name(data_dir, durability):
    rocks = RocksConfig(durability=durability)
    with Store(data_dir, rocks=rocks) as store:
        store.create_table(table_config())
        store.update("t", np.arange(10), np.ones((10, 8), np.float32))
        store.flush()
        store.drop_table("t")
        store.create_table(table_config())
        with pytest.raises(RowNotFound):
            store.lookup("t", np.arange(10), on_miss="error")
    with Store(data_dir, rocks=rocks) as reopened:
        assert reopened.list_tables() == ["t"]
        with pytest.raises(RowNotFound):
            reopened.lookup("t", np.arange(10), on_miss="error")
        assert len(reopened.rocks.families()) == 1        # the old incarnation's family is gone


def test_a_flush_tells_the_eviction_tracker_so_the_next_one_writes_nothing(store):
    store.create_table(table_config(rows=256, ways=32, eviction=EvictionConfig(ttl_seconds=3600)))
    store.update("t", np.arange(200), np.ones((200, 8), np.float32))
    store.flush()
    written = store.stats("t")["rows_written"]
    store.flush()
    assert store.stats("t")["rows_written"] == written


def test_lookups_of_one_table_go_on_while_the_writer_is_busy_with_another(store):
    store.create_table(table_config(name="a", rows=256, ways=32))
    store.create_table(table_config(name="b", rows=256, ways=32))
    store.update("a", np.arange(50), np.ones((50, 8), np.float32))
    store.update("b", np.arange(200), np.ones((200, 8), np.float32))
    release, started = threading.Event(), threading.Event()
    store.writer.submit(WriteJob(None, lambda: (started.set(), release.wait()), "a long write"))
    assert started.wait(10)
    exporting = threading.Thread(target=lambda: list(store.export_table("b")))
    exporting.start()                       # waits behind the long write
    for _ in range(20):                     # table a answers meanwhile (hits and misses)
        assert store.lookup("a", np.arange(60)).weights.shape == (60, 8)
    assert exporting.is_alive()
    release.set()
    exporting.join(10)
    assert not exporting.is_alive()


def test_a_step_that_would_write_nan_is_refused_and_changes_nothing(store):
    store.create_table(table_config(optimizer=OptimizerConfig(name="sgd", lr=1.0)))
    ids = np.arange(4)
    store.update("t", ids, np.full((4, 8), 3e38, np.float32))
    with pytest.raises(InvalidArgument, match=r"grads: .*ids \[0, 1, 2, 3\]"):
        store.apply_gradients("t", ids, np.full((4, 8), -3e38, np.float32))   # 3e38 + 3e38 = inf
    np.testing.assert_array_equal(store.lookup("t", ids).weights, np.full((4, 8), 3e38, np.float32))


def test_integer_weights_are_refused_naming_the_field(store):
    store.create_table(table_config())
    with pytest.raises(InvalidArgument, match="weights: must be floating point"):
        store.update("t", np.arange(2), np.ones((2, 8), np.int64))
    assert store.stats("t").get("rows_updated", 0) == 0


def test_a_lookup_refused_with_not_found_initializes_nothing(store):
    store.create_table(table_config())
    with pytest.raises(RowNotFound):
        store.lookup("t", np.arange(5), on_miss="error")
    assert store.stats("t").get("rows_initialized", 0) == 0


def test_readers_never_see_a_row_mixed_from_two_writes(store):
    store.create_table(table_config(rows=64, ways=32, optimizer=OptimizerConfig(name="adagrad", lr=0.0)))
    ids = np.arange(96)                      # more ids than slots: rows also move through RocksDB
    store.update("t", ids, np.zeros((96, 8), np.float32), np.zeros((96, 8), np.float32))
    barrier = threading.Barrier(3)
    mixed: list[int] = []

    def write():
        barrier.wait()
        for version in range(1, 150):
            store.update("t", ids, np.full((96, 8), version, np.float32), np.full((96, 8), version, np.float32))

    def step():
        barrier.wait()
        for _ in range(150):
            store.apply_gradients("t", ids, np.zeros((96, 8), np.float32))

    def read():
        barrier.wait()
        for _ in range(150):
            got = store.lookup("t", ids, with_state=True)
            same = (got.weights == got.weights[:, :1]).all(axis=1) & (got.state == got.weights[:, :1]).all(axis=1)
            mixed.extend(ids[~same].tolist())

    threads = [threading.Thread(target=f) for f in (write, step, read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mixed == []


def test_nothing_outside_table_py_touches_a_tables_private_state():
    """Snapshots, transfer, sweeps, archive and the store use Table's public methods only."""
    private = {"_lock", "_write_back", "_ids", "_matrix", "_leases", "_place", "_write_now", "_write_behind"}
    root = Path(kvstore.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "table.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id != "self":
                if node.attr in private or (node.attr == "cache" and node.value.id in ("table", "handle", "t")):
                    offenders.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    assert offenders == []


def test_a_row_limited_table_reopens_without_counting_its_keys(data_dir, monkeypatch):
    with Store(data_dir) as store:
        store.create_table(table_config(rows=256, ways=32, eviction=EvictionConfig(max_rows=10_000)))
        store.update("t", np.arange(500), np.ones((500, 8), np.float32))
        store.delete("t", np.arange(100))

    def scan(*_):
        raise AssertionError("the row count was scanned on open")
    monkeypatch.setattr(RocksTier, "count_keys", scan)
    with Store(data_dir) as reopened:
        assert reopened.stats("t")["rows"] == 400


def test_a_cache_this_machine_cannot_hold_is_resource_exhausted_naming_the_bytes(store):
    with pytest.raises(ResourceExhausted, match=r"cache.rows: .* need \d+ bytes"):
        store.create_table(table_config(dim=1024, rows=1 << 34, ways=32))
    assert store.list_tables() == [] and store.rocks.families() == []
