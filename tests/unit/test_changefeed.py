"""The change feed and delta checkpoints, in process: sequences, window, restarts, chains."""
from __future__ import annotations

import numpy as np
import pytest

from kvstore import (
    EvictionConfig,
    FailedPrecondition,
    InvalidArgument,
    OptimizerConfig,
    Store,
    SweeperConfig,
    changefeed,
)
from kvstore.changefeed import ChangeFeedConfig, OutsideWindow
from kvstore.delta import export_since, import_link

from .conftest import table_config


def rows(store: Store, table: str, ids) -> np.ndarray:
    return store.lookup(table, np.asarray(ids), on_miss="zeros", with_state=True).weights


def all_rows(store: Store, table: str) -> dict[int, bytes]:
    out = {}
    for chunk in store.export_table(table):
        for i, w, s in zip(chunk.ids, chunk.weights, chunk.state, strict=True):
            out[int(i)] = w.tobytes() + s.tobytes()
    return out


def test_every_applied_write_gets_the_next_sequence_and_names_its_ids(store):
    store.create_table(table_config("a"))
    store.create_table(table_config("b"))
    start = store.changes.last
    store.update("a", [1, 2], np.ones((2, 8)))
    store.apply_gradients("b", [7, 7], np.ones((2, 8)))
    store.delete("a", [2, 99])
    assert store.changes.last == start + 3
    changes = store.changes.changes(start)
    assert changes.through == start + 3
    assert changes.ids["a"].tolist() == [1, 2, 99] and changes.ids["b"].tolist() == [7]
    assert store.changes.changes(start, ["b"]).ids.keys() == {"b"}


def test_a_reader_before_the_window_gets_the_oldest_available_sequence(tmp_path):
    with Store(str(tmp_path / "d"), changefeed=ChangeFeedConfig(window_rows=10)) as store:
        store.create_table(table_config())
        start = store.changes.last
        for i in range(6):
            store.update("t", [3 * i, 3 * i + 1, 3 * i + 2], np.zeros((3, 8)))
        assert store.changes.floor > start
        with pytest.raises(OutsideWindow, match=f"oldest available sequence is {store.changes.floor}"):
            store.changes.changes(start)
        inside = store.changes.changes(store.changes.floor)
        assert len(inside.ids["t"]) <= 10


def test_a_clean_restart_resumes_the_sequence_and_a_crash_skips_past_it(data_dir):
    store = Store(data_dir)
    store.create_table(table_config())
    store.update("t", [1], np.ones((1, 8)))
    last, feed_id = store.changes.last, store.changes.feed_id
    store.close()
    with Store(data_dir) as reopened:
        assert reopened.changes.last == last and reopened.changes.feed_id == feed_id
        reopened.changes.check(last)                   # a follower that had everything resumes
        reopened.update("t", [2], np.ones((1, 8)))
        crashed_at = reopened.changes.last
        reopened.changes._closed = True                # as if killed: the clean close never happens
    with Store(data_dir) as after_crash:
        assert after_crash.changes.last > crashed_at
        with pytest.raises(OutsideWindow):
            after_crash.changes.check(crashed_at)


def test_a_snapshot_restore_sends_every_follower_back_to_bootstrap(store):
    store.create_table(table_config())
    store.update("t", [1], np.ones((1, 8)))
    store.create_snapshot("s")
    before = store.changes.last
    store.restore_snapshot("s")
    with pytest.raises(FailedPrecondition):
        store.changes.check(before)


def test_a_delta_holds_changed_rows_with_their_latest_value_and_tombstones(store):
    store.create_table(table_config())
    store.update("t", np.arange(10), np.zeros((10, 8)))
    since = store.changes.last
    for step in range(5):                                # a hot row: changed often, sent once
        store.update("t", [3], np.full((1, 8), step, np.float32))
    store.delete("t", [4])
    delta = export_since(store, "t", since)
    chunks = list(delta)
    assert delta.sequence == store.changes.last
    assert np.concatenate([c.rows.ids for c in chunks]).tolist() == [3]
    assert chunks[0].rows.weights[0, 0] == 4
    assert np.concatenate([c.tombstones for c in chunks]).tolist() == [4]


def test_store_eviction_is_recorded_as_a_tombstone(store):
    store.create_table(table_config(eviction=EvictionConfig(min_norm=0.5)))
    store.update("t", [1, 2], np.stack([np.zeros(8), np.ones(8)]))
    since = store.changes.last
    assert store.evict("t")["norm"] == 1
    chunks = list(export_since(store, "t", since))
    assert np.concatenate([c.tombstones for c in chunks]).tolist() == [1]


def test_a_full_export_and_three_deltas_rebuild_the_table_and_chains_are_checked(tmp_path):
    rng = np.random.default_rng(0)
    with Store(str(tmp_path / "src"), sweeper=SweeperConfig(enabled=False)) as src, \
            Store(str(tmp_path / "dst")) as dst:
        src.create_table(table_config(optimizer=OptimizerConfig(name="adagrad")))
        src.apply_gradients("t", np.arange(200), rng.standard_normal((200, 8)))
        full = src.export_table("t")
        import_link(dst, "t", list(full), full.sequence, config=src.describe_table("t"))
        since = full.sequence
        deltas = []
        for round_ in range(3):
            src.apply_gradients("t", rng.integers(0, 300, 50), rng.standard_normal((50, 8)))
            src.delete("t", [round_ * 7])
            delta = export_since(src, "t", since)
            deltas.append((list(delta), delta.since, delta.sequence))
            since = delta.sequence
        with pytest.raises(FailedPrecondition, match=f"starts at sequence {deltas[1][1]}.*ended at sequence "
                                                     f"{full.sequence}"):
            import_link(dst, "t", deltas[1][0], deltas[1][2], since=deltas[1][1])
        for chunks, start, end in deltas:
            import_link(dst, "t", chunks, end, since=start)
        assert all_rows(dst, "t") == all_rows(src, "t")


def test_a_dropped_table_is_in_the_feed_and_refuses_deltas_across_the_drop(store):
    store.create_table(table_config())
    store.update("t", [1, 2], np.ones((2, 8)))
    since = store.changes.last
    store.drop_table("t")
    store.create_table(table_config())
    store.update("t", [5], np.ones((1, 8)))
    changes = store.changes.changes(since)
    assert changes.dropped == {"t"} and changes.ids["t"].tolist() == [5]    # rows of the old table forgotten
    with pytest.raises(FailedPrecondition, match="dropped and created again"):
        export_since(store, "t", since)


def test_sequences_past_a_reservation_block_never_repeat_after_a_crash(data_dir, monkeypatch):
    monkeypatch.setattr(changefeed, "RESERVE", 4)               # a new reservation every 4 sequences
    store = Store(data_dir)
    store.create_table(table_config())
    for i in range(10):
        store.update("t", [i], np.ones((1, 8)))
    handed_out = store.changes.last
    store.changes._closed = True                                 # killed: no clean close
    store.close()
    with Store(data_dir) as reopened:
        assert reopened.changes.last > handed_out
        reopened.update("t", [1], np.ones((1, 8)))
        assert reopened.changes.last > handed_out + 1


def test_a_bad_window_size_is_invalid_argument(tmp_path):
    with pytest.raises(InvalidArgument, match="window_rows"):
        Store(str(tmp_path / "d"), changefeed=ChangeFeedConfig(window_rows=0))


def test_archive_restores_and_merge_imports_are_recorded_and_a_replace_import_resets(store):
    store.create_table(table_config(eviction=EvictionConfig(min_norm=0.5, archive_seconds=1000)))
    store.update("t", [1, 2], np.stack([np.zeros(8), np.ones(8)], dtype=np.float32))
    assert store.evict("t")["norm"] == 1
    since = store.changes.last
    assert store.restore_rows("t", [1]) == 1
    assert store.changes.changes(since).ids["t"].tolist() == [1]
    since = store.changes.last
    store.import_table("t", [(np.array([5, 6]), np.ones((2, 8), np.float32))], mode="merge")
    assert store.changes.changes(since).ranges["t"].tolist() == [[5, 6]]
    since = store.changes.last
    store.import_table("t", [(np.array([7]), np.ones((1, 8), np.float32))], mode="replace")
    with pytest.raises(OutsideWindow):          # rows went that the log cannot list: followers re-bootstrap
        store.changes.changes(since)


def test_an_export_names_its_sequence_and_a_delta_read_counts_no_access(store):
    store.create_table(table_config())
    store.update("t", [1, 2], np.ones((2, 8), np.float32))
    export = store.export_table("t")
    assert export.sequence == store.changes.last
    export.close()
    before = store.table("t").read_rows(np.array([1, 2]))[0].copy()
    since = store.changes.last - 1
    assert len(list(export_since(store, "t", since))) == 1
    after, exists = store.table("t").read_rows(np.array([1, 2]))
    assert exists.all() and np.array_equal(before, after)          # headers (access count, time) unchanged


def test_a_merge_import_is_one_feed_entry_of_its_id_ranges_whatever_its_rows(tmp_path):
    with Store(str(tmp_path / "d"), changefeed=ChangeFeedConfig(window_rows=16)) as store:
        store.create_table(table_config())
        since = store.changes.last
        chunks = [(np.arange(start, start + 1000), np.ones((1000, 8), np.float32)) for start in (0, 1000, 5000)]
        chunks.append((np.arange(100, 200), np.zeros((100, 8), np.float32)))      # out of order: a second run
        store.import_table("t", chunks, mode="merge")
        assert store.changes.last == since + 1 and store.changes.floor <= since   # 30k ids, a window of 16
        assert store.changes.stats()["changefeed_rows"] <= 2
        assert store.changes.changes(since).ranges["t"].tolist() == [[0, 5999]]


def test_a_delta_after_a_merge_import_carries_every_imported_row_and_later_changes(store):
    store.create_table(table_config())
    store.update("t", np.arange(0, 50), np.full((50, 8), 3, np.float32))
    since = store.changes.last
    store.import_table("t", [(np.arange(10, 30), np.full((20, 8), 7, np.float32)),
                             (np.arange(40, 45), np.full((5, 8), 9, np.float32))], mode="merge")
    store.update("t", [12, 100], np.full((2, 8), 5, np.float32))   # after the import: inside and outside its range
    store.delete("t", [20])
    delta = export_since(store, "t", since, chunk_rows=4)
    chunks = list(delta)
    ids = np.concatenate([c.rows.ids for c in chunks])
    tombstones = np.concatenate([c.tombstones for c in chunks])
    weights = np.concatenate([c.rows.weights for c in chunks])
    assert sorted(ids.tolist()) == sorted(set(range(10, 45)) - {20} | {100})    # the range's stored rows, once each
    assert tombstones.tolist() == [20]
    by_id = dict(zip(ids.tolist(), weights[:, 0].tolist(), strict=True))
    assert by_id[12] == 5 and by_id[11] == 7 and by_id[41] == 9 and by_id[35] == 3 and by_id[100] == 5


def test_a_merge_import_drops_only_cached_copies_of_the_imported_ranges(store):
    store.create_table(table_config())
    store.update("t", np.arange(0, 100), np.ones((100, 8), np.float32))
    store.lookup("t", np.arange(0, 100))                                     # all cached
    before = store.table("t").stats()
    store.import_table("t", [(np.arange(10, 20), np.full((10, 8), 2, np.float32))], mode="merge")
    assert store.table("t").stats()["cache_rows"] == before["cache_rows"] - 10
    assert (rows(store, "t", np.arange(10, 20)) == 2).all() and (rows(store, "t", [9, 20]) == 1).all()
