"""Where CuPy or a CUDA device is missing, a GPU table is refused with a clear error."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from gpu.conftest import gpu_usable

from kvstore import CacheConfig, FailedPrecondition, Store, TableConfig


@pytest.mark.skipif(gpu_usable(), reason="a CUDA device is present")
def test_gpu_table_without_a_gpu_is_a_failed_precondition(tmp_path):
    with Store(str(tmp_path / "data")) as store:
        with pytest.raises(FailedPrecondition, match="cache.device"):
            store.create_table(TableConfig(name="t", dim=4, cache=CacheConfig(rows=64, device="cuda:0")))
        assert store.list_tables() == []
    with Store(str(tmp_path / "data")) as store:      # nothing of the refused table was persisted
        assert store.list_tables() == []
        store.create_table(TableConfig(name="t", dim=4))


def test_unknown_device_is_invalid_argument():
    from kvstore import InvalidArgument

    with pytest.raises(InvalidArgument, match="cache.device"):
        CacheConfig(device="tpu")


def _store_as_if_on_a_gpu_host(data_dir: str, cache: CacheConfig) -> None:
    """A data directory whose table `g` was written on a GPU host: rows 0..99 (value = id) in RocksDB, and
    the stored config names `cache`."""
    with Store(data_dir) as store:
        store.create_table(TableConfig(name="g", dim=4, cache=CacheConfig(rows=64, ways=32)))
        store.update("g", np.arange(100), np.repeat(np.arange(100, dtype=np.float32)[:, None], 4, axis=1))
        gpu = TableConfig(name="g", dim=4, cache=cache)
        store.rocks.save_config("g", json.dumps(gpu.to_dict()).encode(), store.table("g").family)


@pytest.mark.skipif(gpu_usable(), reason="a CUDA device is present")
@pytest.mark.parametrize("cache, host_cache", [
    (CacheConfig(rows=128, ways=32, device="cuda:0"), CacheConfig(rows=128, ways=32)),
    (CacheConfig(rows=128, ways=32, device="cuda", host_rows=512, host_policy="lfu", write="write_through"),
     CacheConfig(rows=512, ways=32, policy="lfu", write="write_through")),
])
def test_a_stored_gpu_table_opens_with_a_host_cache_where_the_gpu_is_missing(tmp_path, caplog, cache, host_cache):
    data_dir = str(tmp_path / "data")
    _store_as_if_on_a_gpu_host(data_dir, cache)
    with caplog.at_level(logging.WARNING, logger="kvstore"), Store(data_dir) as store:
        assert store.describe_table("g").cache == host_cache
        rows = store.lookup("g", np.arange(100), on_miss="error").weights
        np.testing.assert_array_equal(rows[:, 0], np.arange(100))
        store.update("g", [7], np.full((1, 4), -1, np.float32))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'g'" in warnings[0] and repr(cache.device) in warnings[0]
    with Store(data_dir) as store:                    # the stored config still names the GPU
        assert store.rocks.load_configs()["g"] == json.dumps(TableConfig(name="g", dim=4, cache=cache)
                                                             .to_dict()).encode()
        assert store.lookup("g", [7], on_miss="error").weights.tolist() == [[-1.0] * 4]


@pytest.mark.skipif(gpu_usable(), reason="a CUDA device is present")
def test_an_import_of_a_gpu_table_config_lands_in_host_memory_where_the_gpu_is_missing(tmp_path):
    config = TableConfig(name="x", dim=4, cache=CacheConfig(rows=64, ways=32, device="cuda:0"))
    with Store(str(tmp_path / "data")) as store:
        assert store.import_table("t", [(np.arange(3), np.ones((3, 4), np.float32), None)], config=config) == 3
        assert store.describe_table("t").cache == CacheConfig(rows=64, ways=32)
