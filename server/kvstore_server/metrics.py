"""Prometheus metrics: every family is declared once, here, with fixed label names and base units.

The store only counts: `StoreCollector` reads `Store.stats(table)` (and the
store-wide counters and RocksDB properties) at scrape time, so nothing is copied
on the request path. Each `Metrics` holds its own registry, so tests use a fresh
one; `docs/operations.md` lists the families and `tests/ops` checks both agree.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from kvstore import Store
from kvstore.errors import KVStoreError

from .metrics_http import serve_metrics

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0)
EVICTED_PREFIX = "evicted_"          # store stats `evicted_<reason>` become kvstore_evictions_total{reason}
EVICTED_ALL = "evicted_rows"         # the sum over reasons: not exported twice


@dataclass(frozen=True)
class Family:
    name: str                        # full name without the `_total` a counter gets on exposition
    kind: str                        # counter | gauge | summary
    help: str
    labels: tuple[str, ...] = ()


def _families(*declared: Family) -> dict[str, Family]:
    return {family.name: family for family in declared}


# Families the collector builds from the store at scrape time.
FAMILIES = _families(
    Family("kvstore_cache_hits", "counter", "Rows found in a tier: cache = the cache tier, rocksdb = "
           "RocksDB after a cache miss.", ("table", "tier")),
    Family("kvstore_cache_misses", "counter", "Rows not found in a tier: cache = went to RocksDB, rocksdb = "
           "absent there and initialized.", ("table", "tier")),
    Family("kvstore_rows_read", "counter", "Rows read from RocksDB.", ("table",)),
    Family("kvstore_rows_written", "counter", "Rows written to RocksDB (write-back, write-through, new rows).",
           ("table",)),
    Family("kvstore_rows_initialized", "counter", "Rows created by the initializer on a lookup miss.", ("table",)),
    Family("kvstore_rows_updated", "counter", "Rows overwritten by Update.", ("table",)),
    Family("kvstore_rows_deleted", "counter", "Rows removed by Delete.", ("table",)),
    Family("kvstore_rows_exported", "counter", "Rows streamed out by Export.", ("table",)),
    Family("kvstore_rows_imported", "counter", "Rows loaded by Import.", ("table",)),
    Family("kvstore_evictions", "counter", "Rows evicted from the store, by rule.", ("table", "reason")),
    Family("kvstore_eviction_sweeps", "counter", "Store-eviction sweeps run.", ("table",)),
    Family("kvstore_eviction_sweep_errors", "counter", "Store-eviction sweeps that failed.", ("table",)),
    Family("kvstore_eviction_sweep_seconds", "counter", "Time spent in store-eviction sweeps.", ("table",)),
    Family("kvstore_eviction_scanned_rows", "counter", "Rows judged by store-eviction sweeps.", ("table",)),
    Family("kvstore_archive_purged_rows", "counter", "Archived rows removed after their retention.", ("table",)),
    Family("kvstore_rows_restored", "counter", "Rows brought back from the eviction archive.", ("table",)),
    Family("kvstore_rows_stepped", "counter", "Rows changed by an optimizer step (ApplyGradients).", ("table",)),
    Family("kvstore_rows_archived", "counter", "Evicted rows kept in the eviction archive.", ("table",)),
    Family("kvstore_admission_rejected", "counter", "Rows not stored because the admission filter had not "
           "seen their id often enough.", ("table",)),
    Family("kvstore_table_rows", "gauge", "Rows stored in the table (exact for tables with a row limit, "
           "RocksDB's estimate otherwise).", ("table",)),
    Family("kvstore_cache_rows", "gauge", "Occupied slots of the cache tier.", ("table",)),
    Family("kvstore_cache_capacity_rows", "gauge", "Slots of the cache tier.", ("table",)),
    Family("kvstore_cache_dirty_rows", "gauge", "Cached rows not yet written to RocksDB.", ("table",)),
    Family("kvstore_cache_locked_rows", "gauge", "Cached rows pinned by prefetch locks.", ("table",)),
    Family("kvstore_rocksdb_block_cache_usage_bytes", "gauge", "Bytes held by RocksDB's block cache."),
    Family("kvstore_rocksdb_block_cache_capacity_bytes", "gauge", "Capacity of RocksDB's block cache."),
    Family("kvstore_rocksdb_estimated_keys", "gauge", "RocksDB's estimate of the keys of a table.", ("table",)),
    Family("kvstore_rocksdb_live_sst_bytes", "gauge", "Bytes of live SST files of a table.", ("table",)),
    Family("kvstore_rocksdb_pending_compaction_bytes", "gauge", "Bytes RocksDB estimates compaction must "
           "rewrite.", ("table",)),
    Family("kvstore_rocksdb_memtable_bytes", "gauge", "Bytes of a table's memtables.", ("table",)),
    Family("kvstore_rocksdb_level0_files", "gauge", "SST files of a table in RocksDB's level 0 (writes slow "
           "down, then stop, when they pile up).", ("table",)),
    Family("kvstore_rocksdb_running_compactions", "gauge", "Compactions running on a table now.", ("table",)),
    Family("kvstore_snapshot_duration_seconds", "summary", "Time to create a snapshot, whole."),
    Family("kvstore_snapshot_pause_seconds", "summary", "Time writes were paused by snapshot creation."),
    Family("kvstore_snapshot_last_pause_seconds", "gauge", "Write pause of the latest snapshot."),
    Family("kvstore_snapshot_max_pause_seconds", "gauge", "Longest write pause of any snapshot since start."),
    Family("kvstore_restore_duration_seconds", "summary", "Time to restore a snapshot."),
    Family("kvstore_snapshots_deleted", "counter", "Snapshots deleted."),
    Family("kvstore_subscribers", "gauge", "Replicas subscribed to update streams."),
    Family("kvstore_replication_lag_seconds", "gauge", "Age of the oldest update not yet sent to a subscriber."),
    # --- replication: the change feed and its subscribers (primary), the follower (replica) ---
    Family("kvstore_replication_lag_sequences", "gauge", "Sequences of the change feed not yet sent to the "
           "furthest-behind subscriber."),
    Family("kvstore_subscribers_dropped", "counter", "Subscribers refused or cut off because the sequence they "
           "needed had left the change feed's window."),
    Family("kvstore_changefeed_sequence", "gauge", "Latest sequence number of the change feed."),
    Family("kvstore_changefeed_oldest_sequence", "gauge", "Oldest sequence a subscriber or delta export may "
           "start from."),
    Family("kvstore_changefeed_rows", "gauge", "Ids held in the change feed's window."),
    Family("kvstore_replica_lag_seconds", "gauge", "Replica: age of the oldest change of the latest applied batch "
           "when it was applied (0 when caught up).", ("primary",)),
    Family("kvstore_replica_lag_sequences", "gauge", "Replica: primary's latest sequence minus the applied one.",
           ("primary",)),
    Family("kvstore_replica_applied_sequence", "gauge", "Replica: every change up to this primary sequence is "
           "applied.", ("primary",)),
    Family("kvstore_replica_connected", "gauge", "Replica: 1 while subscribed to the primary.", ("primary",)),
    Family("kvstore_replica_bootstrapped", "gauge", "Replica: 1 once a bootstrap completed.", ("primary",)),
    Family("kvstore_replica_rows_applied", "counter", "Replica: rows written from the primary (bootstrap and "
           "stream).", ("primary",)),
    Family("kvstore_replica_tombstones_applied", "counter", "Replica: rows deleted because the primary deleted or "
           "evicted them.", ("primary",)),
    Family("kvstore_replica_bootstraps", "counter", "Replica: full copies from the primary, by reason (initial, "
           "window = the primary could not resume us, error).", ("primary", "reason")),
    Family("kvstore_disk_free_bytes", "gauge", "Free bytes on the file system of the data directory."),
    Family("kvstore_disk_capacity_bytes", "gauge", "Size of the file system of the data directory."),
)

# Per-table store stats -> (family, extra label values after the table).
TABLE_STATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cache_hits": ("kvstore_cache_hits", ("cache",)),
    "cache_misses": ("kvstore_cache_misses", ("cache",)),
    "rows_read": ("kvstore_rows_read", ()),
    "rows_written": ("kvstore_rows_written", ()),
    "rows_initialized": ("kvstore_rows_initialized", ()),
    "rows_updated": ("kvstore_rows_updated", ()),
    "rows_deleted": ("kvstore_rows_deleted", ()),
    "rows_exported": ("kvstore_rows_exported", ()),
    "rows_imported": ("kvstore_rows_imported", ()),
    "sweeps": ("kvstore_eviction_sweeps", ()),
    "sweep_errors": ("kvstore_eviction_sweep_errors", ()),
    "sweep_seconds_total": ("kvstore_eviction_sweep_seconds", ()),
    "sweep_rows_scanned": ("kvstore_eviction_scanned_rows", ()),
    "archive_purged": ("kvstore_archive_purged_rows", ()),
    "rows_restored": ("kvstore_rows_restored", ()),
    "rows_stepped": ("kvstore_rows_stepped", ()),
    "cache_locked_rows": ("kvstore_cache_locked_rows", ()),
    "archived_rows": ("kvstore_rows_archived", ()),
    "admission_rejected": ("kvstore_admission_rejected", ()),
    "estimated_rows": ("kvstore_table_rows", ()),
    "cache_rows": ("kvstore_cache_rows", ()),
    "cache_capacity": ("kvstore_cache_capacity_rows", ()),
    "cache_dirty_rows": ("kvstore_cache_dirty_rows", ()),
}
# The RocksDB tier is the second tier: a row found there after a cache miss is a hit,
# one absent there (and initialized) a miss.
TIER_STATS = {"rows_read": ("kvstore_cache_hits", ("rocksdb",)),
              "rows_initialized": ("kvstore_cache_misses", ("rocksdb",))}
ROCKS_PROPERTIES = {key: f"kvstore_rocksdb_{key}" for key in (
    "block_cache_usage_bytes", "block_cache_capacity_bytes", "estimated_keys", "live_sst_bytes",
    "pending_compaction_bytes", "memtable_bytes", "level0_files", "running_compactions",
)}
# Store-wide stats -> families of one sample; summaries are built from (count, sum) pairs below.
STORE_VALUES = {
    "snapshot_pause_seconds_last": "kvstore_snapshot_last_pause_seconds",
    "snapshot_pause_seconds_max": "kvstore_snapshot_max_pause_seconds",
    "subscribers": "kvstore_subscribers",
    "replication_lag_seconds": "kvstore_replication_lag_seconds",
    "snapshots_deleted": "kvstore_snapshots_deleted",
    # replication (kvstore/changefeed.py)
    "replication_lag_sequences": "kvstore_replication_lag_sequences",
    "subscribers_dropped": "kvstore_subscribers_dropped",
    "changefeed_sequence": "kvstore_changefeed_sequence",
    "changefeed_oldest_sequence": "kvstore_changefeed_oldest_sequence",
    "changefeed_rows": "kvstore_changefeed_rows",
}
STORE_SUMMARIES = {
    "kvstore_snapshot_duration_seconds": ("snapshots", "snapshot_seconds_total"),
    "kvstore_snapshot_pause_seconds": ("snapshots", "snapshot_pause_seconds_total"),
    "kvstore_restore_duration_seconds": ("restores", "restore_seconds_total"),
}


class Metrics:
    """RPC metrics recorded by the handlers, plus the store's counters read at scrape time."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.rpc_duration = Histogram(
            "kvstore_rpc_duration_seconds", "Latency of kvstore RPCs by method and status code.",
            ["method", "code"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.rpc_in_flight = Gauge(
            "kvstore_rpc_in_flight", "kvstore RPCs being handled now, by method.", ["method"],
            registry=self.registry,
        )
        self._durations: dict[tuple[str, grpc.StatusCode], object] = {}     # rpc_duration's series by call
        self.auth_failures = Counter(
            "kvstore_auth_failures", "Calls refused for a missing or wrong bearer token.", ["method"],
            registry=self.registry,
        )

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        series = self._durations.get((method, code))
        if series is None:                     # `labels` looks the series up under a lock: once each
            series = self._durations[(method, code)] = self.rpc_duration.labels(method, code.name)
        series.observe(seconds)

    def watch(self, store: Store, data_dir: str | None = None) -> None:
        self.registry.register(StoreCollector(store, data_dir))

    def watch_budgets(self, buffered_bytes, database_bytes) -> None:
        """Gauges of the request-memory and disk budgets, read at scrape time from the two callables."""
        Gauge("kvstore_buffered_request_bytes", "Request bytes streamed writes in progress hold now.",
              registry=self.registry).set_function(buffered_bytes)
        Gauge("kvstore_database_bytes", "Live database size (SST files and memtables) the disk budget compares.",
              registry=self.registry).set_function(database_bytes)

    def watch_same_host(self, segments, gpu_buffers) -> None:
        """Gauges of the same-host path: clients' segments mapped and GPU buffers open, read at scrape time."""
        Gauge("kvstore_same_host_segments", "Clients' shared-memory segments this server has mapped now.",
              registry=self.registry).set_function(segments)
        Gauge("kvstore_same_host_gpu_buffers", "Clients' GPU buffers this server has open now (CUDA IPC).",
              registry=self.registry).set_function(gpu_buffers)

    def watch_leases(self, leases: LeaseCounts) -> None:
        self.registry.register(LeaseCollector(leases))

    def serve(self, host: str, port: int, token: str | None = None, tls: tuple[str, str] | None = None):
        """Start the HTTP(S) exposition server, behind `token` when given; returns (server, thread)."""
        return serve_metrics(self.registry, host, port, token, tls)


class LeaseCounts(Protocol):
    expired_total: int

    def __len__(self) -> int: ...


class LeaseCollector:
    """Live leases and the ones that expired, read at scrape time."""

    def __init__(self, leases: LeaseCounts):
        self.leases = leases

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        live = GaugeMetricFamily("kvstore_leases", "Live prefetch-lock leases.")
        live.add_metric([], len(self.leases))
        expired = CounterMetricFamily("kvstore_leases_expired", "Leases that lapsed unrenewed; their locked "
                                      "rows were released.")
        expired.add_metric([], self.leases.expired_total)
        yield from (live, expired)


class StoreCollector:
    """Reads the store's counters, RocksDB properties and the data disk at every scrape."""

    def __init__(self, store: Store, data_dir: str | None = None):
        self.store = store
        self.data_dir = data_dir

    def describe(self) -> list[Metric]:
        return []        # families vary with the store's tables: never collected at registration

    def collect(self) -> Iterator[Metric]:
        out = _Families()
        try:
            tables = self.store.list_tables()
        except KVStoreError:
            tables = []
        for table in tables:
            try:
                stats = self.store.stats(table)
            except KVStoreError:          # dropped or closing while we scrape
                continue
            self._table(out, table, stats)
        self._store_wide(out)
        self._rocksdb(out)
        self._disk(out)
        yield from out.metrics()

    @staticmethod
    def _table(out: _Families, table: str, stats: dict[str, float]) -> None:
        if "rows" in stats:                     # exact count (tables with a row limit) over the estimate
            stats = {**stats, "estimated_rows": stats["rows"]}
        for stat, value in stats.items():
            for mapping in (TABLE_STATS, TIER_STATS):
                if stat in mapping:
                    name, labels = mapping[stat]
                    out.add(name, (table, *labels), value)
            if stat.startswith(EVICTED_PREFIX) and stat != EVICTED_ALL:
                out.add("kvstore_evictions", (table, stat[len(EVICTED_PREFIX):]), value)

    def _store_wide(self, out: _Families) -> None:
        try:
            stats = self.store.store_stats()
        except KVStoreError:
            return
        for stat, name in STORE_VALUES.items():
            if stat in stats:
                out.add(name, (), stats[stat])
        for name, (count, total) in STORE_SUMMARIES.items():
            if count in stats:
                out.summary(name, stats[count], stats.get(total, 0.0))

    def _rocksdb(self, out: _Families) -> None:
        try:
            properties = self.store.rocks.properties()
        except KVStoreError:                     # closed, or swapped by a restore mid-scrape
            return
        for family, values in properties.items():
            labels = (family,) if family else ()
            for key, value in values.items():
                if key in ROCKS_PROPERTIES:
                    out.add(ROCKS_PROPERTIES[key], labels, value)

    def _disk(self, out: _Families) -> None:
        if not self.data_dir:
            return
        try:
            fs = os.statvfs(self.data_dir)
        except OSError:
            return
        out.add("kvstore_disk_free_bytes", (), fs.f_bavail * fs.f_frsize)
        out.add("kvstore_disk_capacity_bytes", (), fs.f_blocks * fs.f_frsize)


class _Families:
    """Metric families of one scrape, created on first sample from their `FAMILIES` declaration."""

    def __init__(self):
        self._built: dict[str, Metric] = {}

    def _family(self, name: str) -> Metric:
        if name not in self._built:
            family = FAMILIES[name]
            kind = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                    "summary": SummaryMetricFamily}[family.kind]
            self._built[name] = kind(name, family.help, labels=list(family.labels))
        return self._built[name]

    def add(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self._family(name).add_metric(list(labels), float(value))

    def summary(self, name: str, count: float, total: float) -> None:
        self._family(name).add_metric([], count_value=count, sum_value=total)

    def metrics(self) -> list[Metric]:
        return list(self._built.values())


def declared_names() -> set[str]:
    """Every family name as it appears in the exposition (counters with `_total`)."""
    names = {f"{f.name}_total" if f.kind == "counter" else f.name for f in FAMILIES.values()}
    return names | {"kvstore_rpc_duration_seconds", "kvstore_rpc_in_flight", "kvstore_auth_failures_total",
                     "kvstore_leases", "kvstore_leases_expired_total", "kvstore_buffered_request_bytes",
                     "kvstore_database_bytes", "kvstore_same_host_segments", "kvstore_same_host_gpu_buffers"}
