"""Prometheus metrics: one registry object holding RPC latency and the store's counters.

The store only counts; `StoreCollector` reads `Store.stats()` per table at
scrape time, so nothing is copied on the request path.
"""
from __future__ import annotations

import re

import grpc
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvstore import Store
from kvstore.errors import KVStoreError

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0)
# Store counters that only grow; every other stat is exported as a gauge.
MONOTONIC = frozenset({
    "cache_hits", "cache_misses", "rows_read", "rows_written", "rows_updated",
    "rows_deleted", "rows_initialized", "rows_exported", "rows_imported",
    "evicted_rows", "evicted_ttl", "evicted_norm", "evicted_frequency", "evicted_capacity", "evicted_score",
    "sweeps", "sweep_rows_scanned", "sweep_seconds_total", "archived_rows", "archive_purged", "rows_restored",
    "admission_rejected",
})
STORE_MONOTONIC = frozenset({"snapshots", "restores", "snapshots_deleted", "rows_imported"})
_INVALID = re.compile(r"[^a-zA-Z0-9_]")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.rpc_duration = Histogram(
            "kvstore_rpc_duration_seconds", "Latency of kvstore RPCs by method and status code.",
            ["method", "code"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.rpc_duration.labels(method, code.name).observe(seconds)

    def watch(self, store: Store) -> None:
        self.registry.register(StoreCollector(store))

    def serve(self, host: str, port: int):
        """Start the HTTP exposition server; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)


class StoreCollector:
    """`kvstore_table_<stat>{table=...}` for every table, read at scrape time."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        try:
            tables = self.store.list_tables()
        except KVStoreError:
            return
        for table in tables:
            try:
                stats = self.store.stats(table)
            except KVStoreError:          # dropped or closing while we scrape
                continue
            for stat, value in stats.items():
                family = families.get(stat)
                if family is None:
                    name = "kvstore_table_" + _INVALID.sub("_", stat)
                    kind = CounterMetricFamily if stat in MONOTONIC else GaugeMetricFamily
                    family = families[stat] = kind(name, f"Store stat {stat!r} per table.", labels=["table"])
                family.add_metric([table], value)
        yield from families.values()
        yield from _store_families(self.store)


def _store_families(store: Store):
    """Store-wide stats (snapshot pause and duration, restores, imports): counters end in _total."""
    try:
        stats = store.store_stats()
    except KVStoreError:
        return
    for stat, value in sorted(stats.items()):
        name = "kvstore_store_" + _INVALID.sub("_", stat)
        if stat.endswith("_total") or stat in STORE_MONOTONIC:
            yield CounterMetricFamily(name, f"Store-wide count {stat!r}.", value=value)
        else:
            yield GaugeMetricFamily(name, f"Store-wide stat {stat!r}.", value=value)
