"""Snapshots, restore and export/import of tables whose cache lives on the GPU."""
from __future__ import annotations

import numpy as np

from kvstore import CacheConfig, OptimizerConfig, Store, TableConfig

from .conftest import require_gpu

require_gpu()


def gpu_table(name: str = "g") -> TableConfig:
    return TableConfig(name=name, dim=16, optimizer=OptimizerConfig(name="adam"),
                       cache=CacheConfig(rows=256, ways=32, device="cuda:0"))


def test_snapshot_restore_and_round_trip_with_dirty_gpu_rows(tmp_path):
    ids = np.arange(1000)
    weights = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32)
    state = np.random.default_rng(1).random((1000, 32)).astype(np.float32)
    with Store(str(tmp_path / "a")) as store:
        store.create_table(gpu_table())
        store.update("g", ids, weights, state)             # many of them dirty in GPU memory
        store.create_snapshot("s")
        store.update("g", ids, np.zeros((1000, 16), np.float32))
        store.restore_snapshot("s")
        got = store.lookup("g", ids, on_miss="error", with_state=True)
        assert np.asarray(got.weights).tobytes() == weights.tobytes()
        store.update("g", ids[:10], np.ones((10, 16), np.float32))   # dirty again, must be in the export
        chunks = list(store.export_table("g", chunk_rows=300))
        exported = np.concatenate([c.weights for c in chunks])
        assert (exported[:10] == 1).all() and exported[10:].tobytes() == weights[10:].tobytes()
        with Store(str(tmp_path / "b")) as other:
            other.create_table(gpu_table())
            other.update("g", [5], np.full((1, 16), 9.0, np.float32))    # a cached row the import replaces
            other.import_table("g", chunks, mode="replace")
            copy = other.lookup("g", ids, on_miss="error", with_state=True)
            assert np.asarray(copy.weights).tobytes() == exported.tobytes()
            assert np.asarray(copy.state).tobytes() == state.tobytes()
