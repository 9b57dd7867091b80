"""GPU tables under store eviction and admission, and the HBM -> DRAM -> SSD stack: the same rows
as a host table through every operation."""
from __future__ import annotations

import numpy as np
import pytest

from kvstore import CacheConfig, EvictionConfig, OptimizerConfig, Store, SweeperConfig, TableConfig
from kvstore.rows import decode_keys

from .conftest import require_gpu

require_gpu()

T0 = 1_000_000
FAST = SweeperConfig(enabled=False, rows_per_second=1e7, chunk_rows=64)


class Clock:
    def __init__(self):
        self.now = float(T0)

    def __call__(self) -> float:
        return self.now


def config(name: str, device: str, rows: int, host_rows: int = 0, write: str = "write_back",
           eviction: EvictionConfig | None = None, optimizer: str = "adagrad") -> TableConfig:
    return TableConfig(name=name, dim=16, optimizer=OptimizerConfig(name=optimizer, lr=0.05),
                       cache=CacheConfig(rows=rows, ways=32, write=write, device=device, host_rows=host_rows),
                       eviction=eviction or EvictionConfig())


def stored(store: Store, name: str) -> dict[int, bytes]:
    store.flush()
    keys, values = store.rocks.scan(store.table(name).family, None, 1 << 40)
    return dict(zip(decode_keys(keys).tolist(), values, strict=True)) if keys else {}


@pytest.mark.parametrize("rule", [
    EvictionConfig(ttl_seconds=100),
    EvictionConfig(max_rows=150, headroom=0.1),
    EvictionConfig(decay_rate=0.5, count_threshold=2),
    EvictionConfig(min_count=2),
])
def test_store_eviction_and_admission_on_a_gpu_table_match_the_host_table(tmp_path, rule):
    clock = Clock()
    with Store(str(tmp_path / "data"), clock=clock, sweeper=FAST) as store:
        store.create_table(config("host", "cpu", 64, eviction=rule))
        store.create_table(config("gpu", "cuda:0", 64, eviction=rule))
        rng = np.random.default_rng(5)
        for step in range(12):
            ids = rng.integers(0, 300, 120)
            for name in ("host", "gpu"):
                store.lookup(name, ids)
                store.apply_gradients(name, ids[:40], np.ones((40, 16), np.float32))
            clock.now += 15
            if step % 4 == 3:
                assert store.evict("gpu") == store.evict("host")
        assert stored(store, "gpu") == stored(store, "host")    # same rows, headers included


@pytest.mark.parametrize("write", ["write_back", "write_through"])
def test_three_tiers_keep_the_rows_a_host_table_keeps(tmp_path, write):
    """A 64-row GPU tier over a 128-row host tier over RocksDB: victims move down, misses in HBM
    are served from DRAM, dirty rows reach RocksDB once, and every row equals the host table's."""
    clock = Clock()
    with Store(str(tmp_path / "data"), clock=clock) as store:
        store.create_table(config("host", "cpu", 1024, write=write))
        store.create_table(config("tiers", "cuda:0", 64, host_rows=128, write=write))
        rng = np.random.default_rng(9)
        for batch in range(40):
            ids = rng.integers(0, 400, 150)
            a = store.lookup("host", ids, with_state=True)
            b = store.lookup("tiers", ids, with_state=True)
            np.testing.assert_allclose(b.weights, a.weights, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(b.state, a.state, rtol=1e-6, atol=1e-7)
            grads = rng.standard_normal((len(ids), 16)).astype(np.float32)
            store.apply_gradients("host", ids, grads)
            store.apply_gradients("tiers", ids, grads)
            if batch % 5 == 2:
                new = rng.standard_normal((30, 16)).astype(np.float32)
                store.update("host", ids[:30], new)
                store.update("tiers", ids[:30], new)
            if batch % 9 == 4:
                store.delete("host", ids[30:35])
                store.delete("tiers", ids[30:35])
            clock.now += 1
        stats = store.stats("tiers")
        assert stats["host_tier_rows"] > 0 and stats["host_tier_reads"] > 0
        assert stats["cache_rows"] <= 64 and stats["host_tier_rows"] <= 128
        everything = np.arange(400)
        np.testing.assert_allclose(store.lookup("tiers", everything, on_miss="zeros").weights,
                                   store.lookup("host", everything, on_miss="zeros").weights, rtol=1e-6, atol=1e-7)
        host_rows, tier_rows = stored(store, "host"), stored(store, "tiers")
        assert host_rows.keys() == tier_rows.keys()
        assert store.stats("tiers")["host_tier_dirty_rows"] == 0
    with Store(str(tmp_path / "data"), clock=clock) as reopened:      # a graceful stop lost nothing
        np.testing.assert_allclose(reopened.lookup("tiers", everything, on_miss="zeros").weights,
                                   reopened.lookup("host", everything, on_miss="zeros").weights,
                                   rtol=1e-6, atol=1e-7)


def test_a_gpu_cache_larger_than_the_device_is_resource_exhausted_naming_the_bytes(tmp_path):
    from kvstore import ResourceExhausted

    with Store(str(tmp_path / "data")) as store:
        with pytest.raises(ResourceExhausted, match=r"cache.rows: 17179869184 slots .* bytes of GPU memory"):
            store.create_table(config("huge", "cuda:0", 1 << 34))
        assert store.list_tables() == []
        store.create_table(config("fits", "cuda:0", 1 << 10))
