"""Fixtures for unit tests: a real Store over RocksDB in a temporary directory."""
from __future__ import annotations

import numpy as np
import pytest

from kvstore import CacheConfig, Store, TableConfig
from kvstore.rows import RowLayout, encode_keys


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "data")


@pytest.fixture
def store(data_dir):
    with Store(data_dir) as opened:
        yield opened


def table_config(name: str = "t", dim: int = 8, rows: int = 64, ways: int = 4, **kwargs) -> TableConfig:
    """A small table; `rows`/`ways` size its cache, `policy`/`write` pass through to CacheConfig."""
    cache_keys = {k: kwargs.pop(k) for k in ("policy", "write", "flush_seconds") if k in kwargs}
    cache_keys.setdefault("flush_seconds", 3600.0)   # write-back rows stay dirty until a test flushes
    return TableConfig(name=name, dim=dim, cache=CacheConfig(rows=rows, ways=ways, **cache_keys), **kwargs)


def stored_weights(store: Store, table: str, ids) -> list[np.ndarray | None]:
    """Weights as RocksDB holds them (read straight from the tier, bypassing the cache)."""
    config = store.describe_table(table)
    layout = RowLayout.of(config)
    store.writer.drain()       # rows the writer holds are on their way: wait for them
    values = store.rocks.get(store.table(table).family, encode_keys(np.asarray(ids, dtype=np.int64)))
    return [None if v is None else layout.weights(layout.from_values([v]))[0].copy() for v in values]


def ids_in_one_set(cache, count: int, which: int = 0, start: int = 0) -> np.ndarray:
    """`count` ids (>= start) that all map to set `which` of `cache`."""
    candidates = np.arange(start, start + 64 * count * cache.num_sets, dtype=np.int64)
    chosen = candidates[cache.set_of(candidates) == which][:count]
    if len(chosen) < count:
        raise RuntimeError("not enough candidate ids")
    return chosen
