"""The block cache holds what the table caches above it do not: rows a table's cache has room
for are not kept twice in memory. With memory-mapped reads (`rocksdb.mmap_reads`) the data
blocks stay in the page cache, and the block cache holds index and filter blocks only."""
from __future__ import annotations

import numpy as np

from kvstore import RocksConfig, Store

from .conftest import table_config

DIM = 64
ROW_BYTES = DIM * 4


def block_cache_bytes(store: Store) -> int:
    return store.rocks.properties()[""]["block_cache_usage_bytes"]


def stored_table(data_dir: str, name: str, rows: int, cache_rows: int) -> None:
    with Store(data_dir) as store:
        store.create_table(table_config(name, dim=DIM, rows=cache_rows, ways=8))
        weights = np.random.default_rng(1).standard_normal((rows, DIM), dtype=np.float32)
        store.update(name, np.arange(rows), weights)
        store.flush()


def block_cache_growth_of_reading(data_dir: str, name: str, rows: int, mmap_reads: bool = False) -> int:
    """Block cache bytes added by reading every row of `name` from RocksDB once (fresh store)."""
    with Store(data_dir, RocksConfig(mmap_reads=mmap_reads)) as store:
        before = block_cache_bytes(store)
        for lo in range(0, rows, 256):
            store.lookup(name, np.arange(lo, min(rows, lo + 256)), on_miss="error")
        return block_cache_bytes(store) - before


def test_rows_a_table_cache_has_room_for_skip_the_block_cache(data_dir):
    stored_table(data_dir, "held", rows=1000, cache_rows=1024)
    grown = block_cache_growth_of_reading(data_dir, "held", 1000)
    assert grown < 1000 * ROW_BYTES // 8       # index and filter blocks only, not the rows


def test_rows_beyond_a_table_cache_fill_the_block_cache(data_dir):
    stored_table(data_dir, "spills", rows=4000, cache_rows=256)
    grown = block_cache_growth_of_reading(data_dir, "spills", 4000)
    assert grown >= 4000 * ROW_BYTES // 2      # the data blocks read: the DRAM tier under the cache


def test_memory_mapped_reads_leave_data_blocks_out_of_the_block_cache(data_dir):
    stored_table(data_dir, "mapped", rows=4000, cache_rows=256)
    grown = block_cache_growth_of_reading(data_dir, "mapped", 4000, mmap_reads=True)
    assert grown < 4000 * ROW_BYTES // 8       # index and filter blocks only: the rows are in the page cache
