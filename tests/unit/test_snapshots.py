"""Snapshots: point-in-time cuts, restore under load, names, failures, restarts."""
from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest

from kvstore import AlreadyExists, CacheConfig, FailedPrecondition, InvalidArgument, NotFound, Store, TableConfig


def small_table(name: str = "t", dim: int = 4, rows: int = 64, ways: int = 4, **kw) -> TableConfig:
    return TableConfig(name=name, dim=dim, cache=CacheConfig(rows=rows, ways=ways), **kw)


@pytest.fixture
def store(tmp_path):
    with Store(str(tmp_path / "data")) as opened:
        yield opened


def rows_of(store: Store, table: str, ids) -> np.ndarray:
    return store.lookup(table, np.asarray(ids), on_miss="error").weights


def test_snapshot_then_restore_brings_back_the_rows_as_they_were(store):
    store.create_table(small_table())
    ids = np.arange(500)
    store.update("t", ids, np.full((500, 4), 1.0))
    info = store.create_snapshot("s1")
    assert info.pause_seconds <= info.duration_seconds
    assert info.tables["t"]["dim"] == 4
    store.update("t", ids, np.full((500, 4), 2.0))
    store.create_table(small_table("later"))
    store.restore_snapshot("s1")
    assert (rows_of(store, "t", ids) == 1.0).all()
    assert store.list_tables() == ["t"]
    stats = store.store_stats()
    assert stats["snapshots"] == 1 and stats["restores"] == 1
    assert stats["snapshot_pause_seconds_last"] == info.pause_seconds


@pytest.fixture
def busy_threads():
    """Switch threads very often, so a race window of microseconds is actually hit."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.mark.parametrize("round_", range(5))
def test_point_in_time_cut_under_four_writers(store, busy_threads, round_):
    """Each writer rewrites its rows with increasing versions in one batch; the snapshot holds,
    per writer, one whole version, and all four versions were current at one common instant."""
    store.create_table(small_table(rows=32, ways=4))     # tiny cache: rows move between tiers mid-batch
    writers, per_writer = 4, 64
    log: list[list[tuple[float, float]]] = [[] for _ in range(writers)]   # version -> (start, ack)
    stop = threading.Event()

    def write(w: int) -> None:
        ids = np.arange(w * per_writer, (w + 1) * per_writer)
        version = 0
        while not stop.is_set() or version < 3:
            version += 1
            start = time.monotonic()
            store.update("t", ids, np.full((per_writer, 4), float(version)))
            log[w].append((start, time.monotonic()))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    while min(len(entries) for entries in log) < 3:
        time.sleep(0.001)
    acked_before = [len(entries) for entries in log]
    store.create_snapshot("cut")
    stop.set()
    for t in threads:
        t.join()
    store.restore_snapshot("cut")
    weights = rows_of(store, "t", np.arange(writers * per_writer)).reshape(writers, per_writer, 4)
    versions = []
    for w in range(writers):
        assert (weights[w] == weights[w, 0, 0]).all(), f"writer {w}'s batch is torn in the snapshot"
        version = int(weights[w, 0, 0])
        assert version >= acked_before[w], "a write acknowledged before the call is missing"
        versions.append(version)
    # version v of writer w was current from its start to the ack of v+1: the intervals must meet
    latest_start = max(log[w][v - 1][0] for w, v in enumerate(versions))
    earliest_next_ack = min(log[w][v][1] for w, v in enumerate(versions) if v < len(log[w]))
    assert latest_start <= earliest_next_ack, "rows of the snapshot come from different instants"


READERS = 4


def test_restore_while_readers_run_no_errors_and_new_reads_see_snapshot(store):
    store.create_table(small_table(rows=128, ways=4))
    ids = np.arange(1000)
    store.update("t", ids, np.full((1000, 4), 1.0))
    store.create_snapshot("before")
    store.update("t", ids, np.full((1000, 4), 2.0))
    errors: list[BaseException] = []
    seen: list[tuple[bool, set]] = []         # (read began after the restore returned, values read)
    stop, restored = threading.Event(), threading.Event()
    all_read_once = threading.Barrier(READERS + 1)
    read_after = [threading.Event() for _ in range(READERS)]

    def read(k: int) -> None:
        rng = np.random.default_rng(k)
        first = True
        while not stop.is_set():
            try:
                after = restored.is_set()
                batch = rng.choice(ids, 64)
                seen.append((after, set(np.unique(rows_of(store, "t", batch)).tolist())))
            except BaseException as exc:   # noqa: BLE001 - any error fails the test
                errors.append(exc)
            if after:
                read_after[k].set()
            if first:
                first = False
                all_read_once.wait(60)     # every reader has read the old database once

    readers = [threading.Thread(target=read, args=(k,)) for k in range(READERS)]
    for r in readers:
        r.start()
    all_read_once.wait(60)
    store.restore_snapshot("before")
    restored.set()
    assert all(event.wait(60) for event in read_after)      # every reader has read the new one too
    stop.set()
    for r in readers:
        r.join()
    assert not errors
    assert all(values in ({1.0}, {2.0}) for _, values in seen), "a read mixed two databases"
    assert all(values == {1.0} for after, values in seen if after)
    assert any(values == {2.0} for after, values in seen if not after)


def test_snapshots_survive_a_restart_and_restore_survives_a_restart(tmp_path):
    path = str(tmp_path / "data")
    with Store(path) as store:
        store.create_table(small_table())
        store.update("t", [1, 2], np.ones((2, 4)))
        store.create_snapshot("keep")
        store.update("t", [1, 2], np.zeros((2, 4)))
        store.restore_snapshot("keep")
        store.update("t", [3], np.full((1, 4), 3.0))
    with Store(path) as store:
        assert [s.name for s in store.list_snapshots()] == ["keep"]
        assert (rows_of(store, "t", [1, 2]) == 1.0).all()
        assert (rows_of(store, "t", [3]) == 3.0).all()
        assert sorted(os.listdir(path)) == ["LIVE", "changefeed.json", "db-1", "snapshots"]


def test_list_and_delete(store):
    store.create_table(small_table())
    store.create_snapshot("b")
    store.create_snapshot("a")
    assert [s.name for s in store.list_snapshots()] == ["a", "b"]
    store.delete_snapshot("a")
    assert [s.name for s in store.list_snapshots()] == ["b"]
    with pytest.raises(NotFound, match="name"):
        store.delete_snapshot("a")
    with pytest.raises(NotFound, match="name"):
        store.restore_snapshot("a")


def tree(path: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files)


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/b", "", ".hidden", "x" * 129, "..", "a b"])
def test_bad_names_are_invalid_argument_and_touch_nothing(store, tmp_path, bad):
    store.create_table(small_table())
    store.create_snapshot("ok")
    before = tree(str(tmp_path))
    for call in (store.create_snapshot, store.restore_snapshot, store.delete_snapshot):
        with pytest.raises(InvalidArgument, match="name"):
            call(bad)
    assert tree(str(tmp_path)) == before


def test_existing_name_is_already_exists(store):
    store.create_table(small_table())
    store.create_snapshot("s")
    with pytest.raises(AlreadyExists, match="name"):
        store.create_snapshot("s")


def test_unwritable_snapshot_dir_is_failed_precondition_and_live_data_intact(store):
    store.create_table(small_table())
    store.update("t", [1], np.ones((1, 4)))
    with open(os.path.join(store.data_dir, "snapshots"), "w") as blocker:   # a file where the dir goes
        blocker.write("not a directory")
    with pytest.raises(FailedPrecondition, match="snapshot .s.*is not a directory"):
        store.create_snapshot("s")
    assert (rows_of(store, "t", [1]) == 1.0).all()
    store.update("t", [1], np.full((1, 4), 5.0))            # writes were not left paused
    assert (rows_of(store, "t", [1]) == 5.0).all()
    assert store.store_stats().get("snapshots", 0) == 0


def test_export_during_restore_finishes_on_the_old_database(store):
    store.create_table(small_table())
    store.update("t", np.arange(100), np.ones((100, 4)))
    store.create_snapshot("empty-ish")
    store.update("t", np.arange(100, 300), np.ones((200, 4)))
    chunks = iter(store.export_table("t", chunk_rows=50))     # pins the live database
    first = next(chunks)
    store.restore_snapshot("empty-ish")
    store._gens.join_retired()                  # closes of databases without pins are done now
    assert "db" in os.listdir(store.data_dir), "the database was closed under an export in flight"
    rest = list(chunks)
    assert len(first) + sum(len(c) for c in rest) == 300
    store._gens.join_retired()
    # the old database is removed once released, and the export's checkpoint once it ended
    assert sorted(os.listdir(store.data_dir)) == ["LIVE", "changefeed.json", "db-1", "snapshots", "staging"]
    assert os.listdir(os.path.join(store.data_dir, "staging")) == []


@pytest.mark.parametrize("durability", ["none", "wal"])
def test_rows_still_dirty_at_the_pause_are_in_the_snapshot_whatever_the_wal(tmp_path, durability, monkeypatch):
    """The pause copies rows RocksDB lacks (dirty or queued) and writes them into the checkpoint
    after it; with the WAL off they must reach its SST files too. The pre-pause flush is switched
    off here, so every row is still dirty at the pause."""
    from kvstore import RocksConfig
    from kvstore.table import Table

    with Store(str(tmp_path / "data"), rocks=RocksConfig(durability=durability)) as store:
        store.create_table(TableConfig(name="t", dim=4, cache=CacheConfig(rows=4096, flush_seconds=3600.0)))
        ids = np.arange(256)
        store.update("t", ids, np.full((256, 4), 1.0))
        assert store.stats("t")["cache_dirty_rows"] == 256
        monkeypatch.setattr(Table, "flush", lambda self, slice_rows=0: 0)
        store.create_snapshot("cut")
        monkeypatch.undo()
        assert store.stats("t")["cache_dirty_rows"] == 256       # the live table still owes them to RocksDB
        store.update("t", ids, np.full((256, 4), 2.0))
        store.restore_snapshot("cut")
        assert (rows_of(store, "t", ids) == 1.0).all()
