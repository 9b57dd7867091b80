"""Export and import of tables: key order, consistency, bit-exact round trips, modes, validation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvstore import CacheConfig, InvalidArgument, OptimizerConfig, Store, TableConfig
from kvstore.transfer import RowChunk


@pytest.fixture
def store(tmp_path):
    with Store(str(tmp_path / "data")) as opened:
        yield opened


def adam_table(name: str = "t", dtype: str = "float32", rows: int = 64) -> TableConfig:
    return TableConfig(name=name, dim=8, dtype=dtype, optimizer=OptimizerConfig(name="adam"),
                       cache=CacheConfig(rows=rows, ways=4))


def fill(store: Store, table: str, ids: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((len(ids), 8)).astype(np.float32)
    state = rng.random((len(ids), 16)).astype(np.float32)
    store.update(table, ids, weights, state)
    return weights, state


def collect(export) -> RowChunk:
    chunks = list(export)
    return RowChunk(*(np.concatenate([getattr(c, f) for c in chunks]) for f in ("ids", "weights", "state", "meta")))


def test_export_is_in_key_order_and_includes_dirty_cached_rows(store):
    store.create_table(adam_table())
    ids = np.array([5, -3, 2**40, -(2**62), 0, 17])
    weights, state = fill(store, "t", ids)         # all of them still dirty in a 64-row cache
    got = collect(store.export_table("t", chunk_rows=4))
    order = np.argsort(ids)
    assert (got.ids == ids[order]).all()
    assert (got.weights == weights[order]).all() and (got.state == state[order]).all()
    assert (got.meta[:, 0] == 1).all()            # access count of one update each


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_into_another_store_is_bit_exact(store, tmp_path, dtype):
    store.create_table(adam_table(dtype=dtype))
    ids = np.arange(-500, 1500) * 7
    fill(store, "t", ids)
    exported = collect(store.export_table("t", chunk_rows=300))
    with Store(str(tmp_path / "other")) as other:
        other.create_table(adam_table(dtype=dtype))
        assert other.import_table("t", store.export_table("t", chunk_rows=300), mode="replace") == len(ids)
        again = collect(other.export_table("t"))
    for f in ("ids", "weights", "state", "meta"):
        assert getattr(again, f).tobytes() == getattr(exported, f).tobytes(), f


def test_export_is_not_torn_by_writes_while_it_streams(store):
    store.create_table(adam_table(rows=32))
    ids = np.arange(2000)
    store.update("t", ids, np.zeros((2000, 8)))
    export = store.export_table("t", chunk_rows=100)       # the cut is this call
    store.update("t", ids[::2], np.ones((1000, 8)))         # lands in RocksDB before the first chunk is read
    store.flush()
    chunks = iter(export)
    first = next(chunks)
    store.update("t", ids, np.ones((2000, 8)))              # and while the export streams
    store.import_table("t", [(np.arange(5000, 5010), np.ones((10, 8)))])
    store.flush()
    weights = np.concatenate([first.weights] + [c.weights for c in chunks])
    assert len(weights) == 2000 and (weights == 0).all()


def test_merge_keeps_other_rows_and_replace_drops_them(store):
    store.create_table(adam_table())
    fill(store, "t", np.arange(10))
    new = np.full((3, 8), 9.0, np.float32)
    store.import_table("t", [(np.array([8, 9, 10]), new)], mode="merge")
    assert len(collect(store.export_table("t")).ids) == 11
    got = store.lookup("t", [9, 10], on_miss="error", with_state=True)
    assert (got.weights == 9.0).all() and (got.state == 0).all()     # no state given: zeros
    store.import_table("t", [(np.array([100]), new[:1])], mode="replace")
    assert collect(store.export_table("t")).ids.tolist() == [100]
    assert store.lookup("t", [3], on_miss="zeros").weights.sum() == 0   # gone from cache too


def test_import_overrides_dirty_cached_rows(store):
    store.create_table(adam_table())
    store.update("t", [1, 2], np.ones((2, 8)))           # dirty in the cache, not yet in RocksDB
    store.import_table("t", [(np.array([1]), np.full((1, 8), 7.0))])
    assert (store.lookup("t", [1], on_miss="error").weights == 7.0).all()
    store.flush()                                          # the stale dirty copy must not come back
    assert (store.lookup("t", [1], on_miss="error").weights == 7.0).all()
    assert (store.lookup("t", [2], on_miss="error").weights == 1.0).all()


def test_overlapping_and_unsorted_chunks_last_write_wins(store):
    store.create_table(adam_table())
    chunks = [
        (np.array([5, 1, 3]), np.full((3, 8), 1.0)),
        (np.array([3, 2, 3]), np.array([[2.0] * 8, [2.0] * 8, [3.0] * 8])),
        (np.array([1]), np.full((1, 8), 4.0)),
    ]
    store.import_table("t", chunks, mode="replace")
    got = collect(store.export_table("t"))
    assert got.ids.tolist() == [1, 2, 3, 5]
    assert got.weights[:, 0].tolist() == [4.0, 2.0, 3.0, 1.0]


@pytest.mark.parametrize("bad, field", [
    ((np.array([1, 2]), np.ones((2, 3))), "weights"),
    ((np.array([1, 2]), np.ones((2, 8)), np.ones((2, 3))), "state"),
    ((np.array([1, 2]), np.full((2, 8), np.nan)), "weights"),
    ((np.array([[1, 2]]), np.ones((2, 8))), "ids"),
    ((np.array([1]), np.ones((1, 8)), None, np.full((1, 3), -1)), "meta"),
])
def test_bad_chunk_anywhere_changes_nothing(store, bad, field):
    store.create_table(adam_table())
    fill(store, "t", np.arange(20))
    before = collect(store.export_table("t"))
    good = (np.arange(100, 110), np.ones((10, 8)))
    with pytest.raises(InvalidArgument, match=field):
        store.import_table("t", [good, bad], mode="replace")
    after = collect(store.export_table("t"))
    assert after.ids.tobytes() == before.ids.tobytes() and after.weights.tobytes() == before.weights.tobytes()


def test_bad_mode_and_unknown_table(store):
    store.create_table(adam_table())
    with pytest.raises(InvalidArgument, match="mode"):
        store.import_table("t", [], mode="upsert")
    with pytest.raises(Exception, match="table"):
        store.export_table("nope")


def test_import_keeps_the_exact_row_count_of_tables_with_a_row_limit(store):
    """Counted without a key scan where the import's ids are distinct and the table had no row left."""
    from kvstore.config import EvictionConfig

    store.create_table(TableConfig(name="capped", dim=8, cache=CacheConfig(rows=64, ways=4),
                                   eviction=EvictionConfig(max_rows=10_000)))
    store.update("capped", np.arange(30), np.ones((30, 8)))
    store.import_table("capped", [(np.arange(20, 50), np.ones((30, 8)))], mode="merge")
    assert store.stats("capped")["rows"] == 50
    store.import_table("capped", [(np.arange(5), np.ones((5, 8)))], mode="replace")
    assert store.stats("capped")["rows"] == 5
    ascending = [(np.arange(0, 40), np.ones((40, 8))), (np.arange(40, 70), np.ones((30, 8)))]
    store.import_table("capped", ascending, mode="replace")
    assert store.stats("capped")["rows"] == 70
    overlapping = [(np.arange(0, 40), np.ones((40, 8))), (np.arange(30, 45), np.ones((15, 8)))]
    store.import_table("capped", overlapping, mode="replace")
    assert store.stats("capped")["rows"] == 45
    store.create_table(TableConfig(name="fresh", dim=8, eviction=EvictionConfig(max_rows=10_000)))
    store.import_table("fresh", ascending, mode="merge")
    assert store.stats("fresh")["rows"] == 70
    store.import_table("fresh", [(np.arange(60, 90), np.ones((30, 8)))], mode="merge")
    assert store.stats("fresh")["rows"] == 90


def test_a_merge_into_a_counted_table_counts_only_the_rows_it_adds(store):
    """The count moves by the keys the import's ranges gained: rows inside a range the import did
    not bring (gaps), rows it overwrote, negative ids, and rows outside every range all count right."""
    from kvstore.config import EvictionConfig

    store.create_table(TableConfig(name="capped", dim=8, cache=CacheConfig(rows=64, ways=4),
                                   eviction=EvictionConfig(max_rows=100_000)))
    existing = np.array([-500, -7, 3, 10, 11, 400, 1 << 40], dtype=np.int64)
    store.update("capped", existing, np.ones((len(existing), 8)))
    imported = np.array([-7, -6, 4, 10, 12, 399, 1 << 41], dtype=np.int64)    # -7 and 10 exist
    store.import_table("capped", [(imported, np.full((len(imported), 8), 2.0))], mode="merge")
    expect = len(np.union1d(existing, imported))
    assert store.stats("capped")["rows"] == expect
    assert sum(len(chunk) for chunk in store.export_table("capped")) == expect
    store.import_table("capped", [(np.array([3, 4]), np.ones((2, 8)))], mode="merge")   # nothing new
    assert store.stats("capped")["rows"] == expect


def test_import_across_a_restore_is_refused_and_imports_nothing(store):
    from kvstore import FailedPrecondition

    store.create_table(adam_table())
    store.create_snapshot("s")
    stager = store.stage_import("t", "merge")
    stager.add(np.arange(5), np.ones((5, 8)))
    store.restore_snapshot("s")
    with pytest.raises(FailedPrecondition, match="restored"):
        store.commit_import(stager)
    assert sum(len(c) for c in store.export_table("t")) == 0


def import_in_parts(store: Store, table: str, sizes: list[int]) -> RowChunk:
    """Import rows in chunks of `sizes` rows (the first ones written here, the rest past the store's
    WORKER_ROWS by its worker process); returns what was sent."""
    rng = np.random.default_rng(7)
    ids = np.arange(sum(sizes)) * 3 - 1000
    weights = rng.standard_normal((len(ids), 8)).astype(np.float32)
    state = rng.random((len(ids), 16)).astype(np.float32)
    meta = rng.integers(0, 2**32, (len(ids), 3), dtype=np.uint64).astype(np.uint32)
    bounds = np.cumsum([0, *sizes])
    parts = [(ids[a:b], weights[a:b], state[a:b], meta[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert store.import_table(table, iter(parts), mode="replace") == len(ids)
    return RowChunk(ids, weights, state, meta)


def assert_exports_as(store: Store, table: str, sent: RowChunk) -> None:
    got = collect(store.export_table(table, chunk_rows=20_000))
    for f in ("ids", "weights", "state", "meta"):
        assert getattr(got, f).tobytes() == getattr(sent, f).tobytes(), f


def test_import_chunk_larger_than_several_shared_memory_slots_is_bit_exact(store):
    store.create_table(adam_table())
    # the 200,000-row chunk (21 MiB of stored rows) takes six 4 MiB slots: more than the worker has
    sent = import_in_parts(store, "t", [70_000, 200_000, 5, 30_000])
    assert_exports_as(store, "t", sent)


def test_transfers_without_shared_memory_go_through_the_pipes_bit_exact(store, monkeypatch):
    from kvstore import transfer_process

    monkeypatch.setattr(transfer_process._WorkerProcess, "map_ring", lambda worker, slot_bytes: None)
    store.create_table(adam_table())
    sent = import_in_parts(store, "t", [70_000, 100_000, 30_000])
    assert_exports_as(store, "t", sent)


def test_export_chunks_too_large_for_a_ring_slot_go_through_the_pipe_bit_exact(store, monkeypatch):
    from kvstore import transfer_process

    store.create_table(adam_table())
    sent = import_in_parts(store, "t", [70_000, 30_000])
    monkeypatch.setattr(transfer_process, "MAX_SLOT_BYTES", 4096)
    assert_exports_as(store, "t", sent)


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_imported_files_are_compressed_as_the_store_is_configured(tmp_path, compression):
    from kvstore import RocksConfig
    from kvstore.transfer import WORKER_ROWS

    rows = 3 * WORKER_ROWS                  # files written in this process and by the worker process
    with Store(str(tmp_path / "data"), RocksConfig(compression=compression)) as store:
        store.create_table(adam_table())
        ids = np.arange(rows, dtype=np.int64)
        parts = [(ids[at:at + 20_000], np.zeros((len(ids[at:at + 20_000]), 8), np.float32))
                 for at in range(0, rows, 20_000)]
        assert store.import_table("t", iter(parts), mode="replace") == rows
        stored = store.rocks.properties()["t"]["live_sst_bytes"]
        row_bytes = store.table("t").layout.row_bytes
        assert (stored > rows * row_bytes) if compression == "none" else (stored * 4 < rows * row_bytes)
        got = collect(store.export_table("t"))
        assert got.ids.tobytes() == ids.tobytes() and not got.weights.any()


def test_wide_rows_past_the_waiting_bytes_go_to_the_worker_and_the_last_write_wins(store):
    from kvstore.transfer import WORKER_BYTES, WORKER_ROWS

    dim = 4096                                        # 16 KiB rows: the bytes, not the rows, start the worker
    store.create_table(TableConfig(name="wide", dim=dim, cache=CacheConfig(rows=64, ways=4)))
    rows = WORKER_BYTES // (dim * 4) * 2
    assert rows < WORKER_ROWS
    ids = np.arange(rows, dtype=np.int64)
    weights = np.random.default_rng(3).standard_normal((rows, dim)).astype(np.float32)
    half = rows // 2
    chunks = [(ids[:half], weights[:half] + 1), (ids[half:], weights[half:]),
              (ids[:half][::-1], weights[:half][::-1])]          # overlaps the first: it wins
    assert store.import_table("wide", iter(chunks), mode="replace") == rows + half
    got = collect(store.export_table("wide"))
    assert got.ids.tobytes() == ids.tobytes() and got.weights.tobytes() == weights.tobytes()


def test_a_replace_import_into_an_empty_table_lands_in_the_last_level_with_nothing_to_compact(store):
    """An import's files go under any older rows; a table with none needs no range tombstone,
    whose presence would make RocksDB put the files in level 0 and rewrite them all."""
    store.create_table(adam_table(rows=32))
    ids = np.arange(40_000)
    chunks = [(ids[lo:lo + 10_000], np.ones((10_000, 8), np.float32)) for lo in range(0, len(ids), 10_000)]
    assert store.import_table("t", chunks, mode="replace") == len(ids)
    family = store.table("t").family
    gauges = store.rocks.properties()[store.rocks.labels.get(family, family)]
    assert gauges["level0_files"] == 0 and gauges["running_compactions"] == 0
    assert len(collect(store.export_table("t")).ids) == len(ids)
    store.import_table("t", [(np.array([7]), np.full((1, 8), 2.0, np.float32))], mode="replace")
    assert collect(store.export_table("t")).ids.tolist() == [7]      # a table with rows: they still go


def test_an_export_over_a_corrupted_block_fails_instead_of_ending_early(store):
    """rocksdict's iteration ends quietly at a block RocksDB cannot read; an export that took that
    for the end of the table would look complete with rows missing."""
    from kvstore import StorageError

    store.create_table(adam_table(rows=32))
    ids = np.arange(2000)
    weights = np.full((2000, 8), 7.25, np.float32)
    store.update("t", ids, weights)
    store.flush()
    store.rocks.flush()
    marker = np.float32(7.25).tobytes() * 8
    path = store.rocks.path
    (sst,) = [file for file in Path(path).glob("*.sst") if marker in file.read_bytes()]
    with open(sst, "r+b") as file:
        data = file.read()
        file.seek(data.index(marker, len(data) // 2) + 3)      # a row in the middle of the file
        file.write(b"\xee")
    with pytest.raises(StorageError, match="(?i)corrupt|checksum"):
        collect(store.export_table("t", chunk_rows=256))
