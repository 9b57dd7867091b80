"""Where CuPy or a CUDA device is missing, a GPU table is refused with a clear error."""
from __future__ import annotations

import importlib.util

import pytest

from kvstore import CacheConfig, FailedPrecondition, Store, TableConfig


def _gpu_usable() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    import cupy

    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver: CuPy's runtime error
        return False


@pytest.mark.skipif(_gpu_usable(), reason="a CUDA device is present")
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
