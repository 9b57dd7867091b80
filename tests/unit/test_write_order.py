"""Rows the writer stores in key order, and reads that skip a memtable's search, lose nothing:
each id keeps its last acknowledged value across evictions and a reopen, and an id the
database lacks reads as its initial row while its neighbours sit in the memtable."""
from __future__ import annotations

import numpy as np

from kvstore import Store

from .conftest import stored_weights, table_config


def test_evicted_rows_keep_their_last_values_whatever_order_their_ids_come_in(data_dir):
    rng = np.random.default_rng(7)
    ids = rng.permutation(np.arange(-3000, 3000, 3, dtype=np.int64))      # negative ids: sign bit flipped in keys
    last = {}
    with Store(data_dir) as store:
        store.create_table(table_config(rows=128, ways=4))                 # tiny cache: nearly every row is evicted
        for round_ in range(3):
            for batch in np.array_split(rng.permutation(ids), 17):
                weights = rng.standard_normal((len(batch), 8)).astype(np.float32) + round_
                store.update("t", batch, weights)
                last.update(zip(batch.tolist(), weights, strict=True))
        assert store.stats("t")["rows_written"] > len(ids)                 # evictions went through the writer
    with Store(data_dir) as store:
        expected = np.stack([last[i] for i in ids.tolist()])
        np.testing.assert_array_equal(store.lookup("t", ids, on_miss="error").weights, expected)
        np.testing.assert_array_equal(np.stack(stored_weights(store, "t", ids)), expected)


def test_new_ids_read_as_initial_rows_while_their_neighbours_sit_in_the_memtable(store):
    store.create_table(table_config(rows=64, ways=4))
    stored = np.arange(0, 4000, 2, dtype=np.int64)                          # in RocksDB's memtable, not flushed
    weights = np.full((len(stored), 8), 5.0, np.float32)
    store.update("t", stored, weights)
    store.flush()
    fresh = stored + 1
    initial = store.lookup("t", fresh, on_miss="init").weights              # the initializer's rows, not stored
    mixed = np.concatenate([fresh, stored])
    rows = store.lookup("t", mixed, on_miss="zeros").weights
    np.testing.assert_array_equal(rows[:len(fresh)], 0)                     # absent: none found by mistake
    np.testing.assert_array_equal(rows[len(fresh):], weights)               # present: every one found
    np.testing.assert_array_equal(store.lookup("t", fresh).weights, initial)      # init_insert stores them
    store.flush()
    np.testing.assert_array_equal(np.stack(stored_weights(store, "t", mixed)), np.concatenate([initial, weights]))


def test_a_flush_of_many_write_slices_stores_every_row_and_reopens_intact(data_dir):
    from kvstore.table import WRITE_SLICE

    rng = np.random.default_rng(11)
    ids = rng.permutation(np.arange(-5 * WRITE_SLICE, 5 * WRITE_SLICE, 3, dtype=np.int64))   # one job, 7 slices
    with Store(data_dir) as store:
        store.create_table(table_config(rows=8192, ways=8))
        first = rng.standard_normal((len(ids), 8)).astype(np.float32)
        store.update("t", ids, first)
        store.flush()
        last = first.copy()
        again = rng.permutation(len(ids))[:len(ids) // 2]        # half the rows change once more before close
        last[again] = first[again] + 1
        store.update("t", ids[again], last[again])
        np.testing.assert_array_equal(np.stack(stored_weights(store, "t", ids[again])), first[again])
    with Store(data_dir) as store:
        np.testing.assert_array_equal(store.lookup("t", ids, on_miss="error").weights, last)
        np.testing.assert_array_equal(np.stack(stored_weights(store, "t", ids)), last)
