"""Prometheus metrics of a running server: values follow the traffic, the exposition passes promtool."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
from kvstore_client import KVStoreClient, NotFoundError
from kvstore_server.metrics import FAMILIES, Metrics, declared_names
from prometheus_client import CollectorRegistry, generate_latest

from kvstore import Store, TableConfig
from kvstore.config import CacheConfig

from .conftest import free_port, needs_promtool, samples, scrape, value

BLOCK_CACHE = 8 << 20


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--rocksdb-block-cache-bytes", str(BLOCK_CACHE), metrics_port=free_port())


@pytest.fixture(scope="module")
def client(server):
    with KVStoreClient(server.address, timeout=30.0) as opened:
        yield opened


def test_lookups_move_hit_miss_and_row_counters_by_tier(server, client):
    client.create_table("moving", 8, cache={"rows": 64, "ways": 8})
    ids = np.arange(512)
    before = samples(scrape(server))
    client.lookup("moving", ids)                 # all new: initialized, most evicted to RocksDB
    middle = samples(scrape(server))
    client.lookup("moving", ids)                 # 64 at most cached, the rest read back from RocksDB
    after = samples(scrape(server))

    def delta(first, second, name, **labels):
        return value(second, name, table="moving", **labels) - value(first, name, table="moving", **labels)

    assert delta(before, middle, "kvstore_cache_misses_total", tier="cache") == 512
    assert delta(before, middle, "kvstore_rows_initialized_total") == 512
    assert delta(before, middle, "kvstore_cache_misses_total", tier="rocksdb") == 512
    assert delta(before, middle, "kvstore_rows_written_total") >= 512 - 64
    hits = delta(middle, after, "kvstore_cache_hits_total", tier="cache")
    misses = delta(middle, after, "kvstore_cache_misses_total", tier="cache")
    assert hits + misses == 512 and misses >= 512 - 64
    assert delta(middle, after, "kvstore_rows_read_total") == misses
    assert delta(middle, after, "kvstore_cache_hits_total", tier="rocksdb") == misses
    assert delta(middle, after, "kvstore_rows_initialized_total") == 0
    assert value(after, "kvstore_cache_capacity_rows", table="moving") == 64
    assert 0 < value(after, "kvstore_cache_rows", table="moving") <= 64


def test_rpc_latency_histogram_counts_calls_by_method_and_code(server, client):
    client.create_table("timed", 4)
    before = samples(scrape(server))
    client.lookup("timed", [1, 2, 3])
    client.lookup("timed", [4])
    with pytest.raises(NotFoundError):
        client.stats("absent")
    after = samples(scrape(server))
    count = "kvstore_rpc_duration_seconds_count"
    assert value(after, count, method="Lookup", code="OK") - value(before, count, method="Lookup", code="OK") == 2
    assert value(after, count, method="Stats", code="NOT_FOUND") - value(before, count, method="Stats",
                                                                          code="NOT_FOUND") == 1
    assert value(after, "kvstore_rpc_duration_seconds_bucket", method="Lookup", code="OK", le="+Inf") == \
        value(after, count, method="Lookup", code="OK")
    assert value(after, "kvstore_rpc_in_flight", method="Lookup") == 0


def test_writes_show_in_rocksdb_properties_and_rows_per_table(server, client):
    client.create_table("stored", 16, cache={"rows": 32, "ways": 8, "write": "write_through"})
    client.update("stored", np.arange(1000), np.ones((1000, 16), np.float32))
    text = scrape(server)
    assert value(text, "kvstore_rows_updated_total", table="stored") == 1000
    assert value(text, "kvstore_rows_written_total", table="stored") == 1000
    assert value(text, "kvstore_rocksdb_memtable_bytes", table="stored") > 16 * 4 * 1000
    assert value(text, "kvstore_rocksdb_estimated_keys", table="stored") > 0
    assert value(text, "kvstore_rocksdb_level0_files", table="stored") == 0          # all in the memtable
    assert value(text, "kvstore_rocksdb_running_compactions", table="stored") == 0
    assert value(text, "kvstore_table_rows", table="stored") > 0
    assert value(text, "kvstore_rocksdb_block_cache_capacity_bytes") == BLOCK_CACHE
    assert 0 < value(text, "kvstore_disk_free_bytes") <= value(text, "kvstore_disk_capacity_bytes")


def test_dropped_table_leaves_the_exposition(server, client):
    client.create_table("brief", 4)
    client.lookup("brief", [1])
    assert value(scrape(server), "kvstore_cache_rows", table="brief") == 1
    client.drop_table("brief")
    assert 'table="brief"' not in scrape(server)


def test_snapshots_and_restores_show_pause_duration_and_counts(server, client):
    client.create_table("snapped", 4)
    client.update("snapped", [1, 2], np.ones((2, 4), np.float32))
    before = samples(scrape(server))
    info = client.create_snapshot("metered")
    client.restore_snapshot("metered")
    client.delete_snapshot("metered")
    after = samples(scrape(server))
    for name in ("kvstore_snapshot_duration_seconds_count", "kvstore_snapshot_pause_seconds_count",
                 "kvstore_restore_duration_seconds_count", "kvstore_snapshots_deleted_total"):
        assert value(after, name) - value(before, name) == 1, name
    assert value(after, "kvstore_snapshot_last_pause_seconds") == pytest.approx(info["pause_seconds"])
    duration = "kvstore_snapshot_duration_seconds_sum"
    assert value(after, duration) - value(before, duration) == pytest.approx(info["duration_seconds"])
    assert value(after, "kvstore_snapshot_max_pause_seconds") >= info["pause_seconds"]
    assert value(after, "kvstore_cache_capacity_rows", table="snapped") > 0     # the table came back
    assert value(after, "kvstore_rocksdb_block_cache_capacity_bytes") == BLOCK_CACHE   # the restored database


def test_an_eviction_sweep_shows_by_reason_with_the_exact_row_count(server, client):
    # no row trigger: the background sweeper would otherwise sweep past max_rows before this sweep does
    client.create_table("capped", 4, cache={"rows": 64, "ways": 8},
                        eviction={"max_rows": 100, "headroom": 0.1, "trigger_rows": 1 << 40})
    client.update("capped", np.arange(300), np.ones((300, 4), np.float32))
    before = samples(scrape(server))
    evicted = client.evict("capped")
    after = samples(scrape(server))
    assert evicted and sum(evicted.values()) >= 200
    for reason, rows in evicted.items():
        assert value(after, "kvstore_evictions_total", table="capped", reason=reason) - \
            value(before, "kvstore_evictions_total", table="capped", reason=reason) == rows
    assert value(after, "kvstore_eviction_sweeps_total", table="capped") - \
        value(before, "kvstore_eviction_sweeps_total", table="capped") == 1
    assert value(after, "kvstore_table_rows", table="capped") == client.stats("capped")["rows"] <= 100


@needs_promtool
def test_exposition_passes_promtool_check_metrics(server, client):
    client.create_table("linted", 4)
    client.lookup("linted", [1, 2])
    result = subprocess.run(["promtool", "check", "metrics"], input=scrape(server), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_exported_family_is_declared(server, client):
    client.create_table("declared", 4)
    client.lookup("declared", [1])
    exported = {name for name, _ in samples(scrape(server)) if name.startswith("kvstore_")}
    suffixes = ("_bucket", "_count", "_sum", "_created")
    bases = {next((n[: -len(s)] for s in suffixes if n.endswith(s) and n[: -len(s)] in declared_names()), n)
             for n in exported}
    assert bases <= declared_names()


# --- the collector over an in-process store, with a fresh registry -----------------------


def _exposition(store: Store, data_dir=None) -> dict:
    metrics = Metrics(CollectorRegistry())
    metrics.watch(store, data_dir)
    return samples(generate_latest(metrics.registry).decode())


def test_eviction_counters_are_exported_by_reason_and_the_total_is_not_exported_twice(tmp_path):
    with Store(str(tmp_path / "store")) as store:
        store.create_table(TableConfig("swept", 4, cache=CacheConfig(rows=32, ways=8)))
        counters = store.table("swept").counters
        counters["evicted_ttl"] += 3
        counters["evicted_max_rows"] += 2
        counters["evicted_rows"] += 5
        counters["sweeps"] += 4
        counters["admission_rejected"] += 6
        counters["archived_rows"] += 2
        exposed = _exposition(store)
    assert value(exposed, "kvstore_eviction_sweeps_total", table="swept") == 4
    assert value(exposed, "kvstore_admission_rejected_total", table="swept") == 6
    assert value(exposed, "kvstore_rows_archived_total", table="swept") == 2
    assert value(exposed, "kvstore_evictions_total", table="swept", reason="ttl") == 3
    assert value(exposed, "kvstore_evictions_total", table="swept", reason="max_rows") == 2
    assert value(exposed, "kvstore_evictions_total", table="swept", reason="rows") == 0
    assert not any(name == "kvstore_evictions_total" and dict(labels).get("reason") == "rows"
                   for name, labels in exposed)


def test_a_closed_store_scrapes_without_error(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.create_table(TableConfig("gone", 4, cache=CacheConfig(rows=32, ways=8)))
    store.close()
    exposed = _exposition(store, str(tmp_path))
    assert not any(name.startswith("kvstore_rocksdb_") for name, _ in exposed)
    assert value(exposed, "kvstore_disk_capacity_bytes") > 0


def test_families_follow_the_naming_conventions():
    for family in FAMILIES.values():
        assert family.name.startswith("kvstore_")
        assert not family.name.endswith("_total"), "counters get _total on exposition"
        # counts and 0/1 states have no unit; change-feed positions are counted in sequence numbers
        if family.kind != "counter" and family.name not in ("kvstore_subscribers", "kvstore_replica_connected",
                                                            "kvstore_replica_bootstrapped",
                                                            "kvstore_rocksdb_level0_files",
                                                            "kvstore_rocksdb_running_compactions"):
            assert family.name.endswith(("_bytes", "_seconds", "_rows", "_keys", "_sequence", "_sequences")), \
                f"{family.name}: no unit"
