"""`lookup`: rows for a batch of ids, in process and through the service.

In process (`Store.lookup`) the limits are NumPy's gather of the same rows from one
array (rows in the cache) and rocksdict's multi-get of the same keys on the same
database (rows not cached). Through the service (`KVStoreClient.lookup` against a
kvstore-server process) the limit is a bare gRPC stream moving the same bytes and
the peer is Redis (pipelined MGET of the same rows as binary values).

Each table is loaded three times, as three tables over the same rows: `all` (a cache
of twice the rows: every row cached), `95%` (a cache of 0.95 of the rows, filled by a
pass over the table: about 95% hits for uniform ids, more for Zipf; the observed hit
rate is noted) and `cold` (a cache of 32 slots: nearly every row from RocksDB).
Scaling: the same lookups on tables of each size (throughput at the largest over the
smallest), and the cost per row against batch size.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from kvstore import CacheConfig, Store, SweeperConfig, TableConfig
from kvstore.rows import RowLayout

from .. import store_bench
from ..context import Context, cache_slots, table_weights
from ..harness import LIMIT, SUBJECT, Record, Side, compare
from . import lookup_service, memory
from .common import Batch, make_batches, observed_hit_rate, settle_compactions

REGIMES = {"all": 0.5, "95%": 1 / 0.95, "cold": None}      # cache load (rows / slots); cold: 32 slots


@dataclass
class Plan:
    sizes: list[int]            # table rows, scaling over these
    dim: int                    # dim of the main matrix
    size_dim: int               # dim of the tables of the size sweep
    dims: list[int]             # dim sweep (at the smallest size, cached, uniform)
    batches: list[int]
    dists: list[str]
    regimes: list[str]
    rows_per_rep: int
    cold_rows_per_rep: int


QUICK = Plan(sizes=[5_000, 10_000], dim=16, size_dim=16, dims=[8], batches=[1024], dists=["zipf"],
             regimes=["all", "95%", "cold"], rows_per_rep=1024, cold_rows_per_rep=1024)
FULL = Plan(sizes=[1_000_000, 10_000_000], dim=128, size_dim=64, dims=[64, 128, 256],
            batches=[4096, 16384, 65536, 262144], dists=["uniform", "zipf"], regimes=["all", "95%", "cold"],
            rows_per_rep=1 << 19, cold_rows_per_rep=1 << 17)


def table_name(regime: str, dim: int) -> str:
    return {"all": "cached", "95%": "p95", "cold": "cold"}[regime] + f"_{dim}"


def table_config(regime: str, dim: int, rows: int) -> TableConfig:
    load = REGIMES[regime]
    slots = 32 if load is None else cache_slots(rows, load)
    return TableConfig(name=table_name(regime, dim), dim=dim, cache=CacheConfig(rows=slots))


def load_store(store: Store, weights: np.ndarray, regimes: list[str], chunk: int = 1 << 18) -> None:
    """Each regime's table holds the same rows; the cached ones are warmed by a pass in id order."""
    rows, dim = weights.shape
    for regime in regimes:
        config = table_config(regime, dim, rows)
        store.import_table(config.name, ((np.arange(lo, min(rows, lo + chunk), dtype=np.int64),
                                          weights[lo:lo + chunk]) for lo in range(0, rows, chunk)),
                           mode="replace", config=config)
        if regime != "cold":
            for lo in range(0, rows, 1 << 16):
                store.lookup(config.name, np.arange(lo, min(rows, lo + (1 << 16)), dtype=np.int64), on_miss="error")


def in_process_case(ctx: Context, store: Store, raw, weights: np.ndarray, case: dict, batches: list[Batch]
                    ) -> list[Record]:
    name = table_name(case["cache"], case["dim"])
    subject = Side("kvstore Store.lookup", SUBJECT, lambda b: store.lookup(name, b.ids, on_miss="error").weights)
    if case["cache"] == "cold":
        family = raw.get_column_family(store.table(name).family)   # the table's incarnation
        layout = RowLayout.of(store.describe_table(name))
        limit = Side("rocksdict multi-get", LIMIT, lambda b: layout.weights(layout.from_values(family.get(b.keys))))
    else:
        limit = Side("numpy gather", LIMIT, lambda b: weights[b.ids])
    hit_rate = observed_hit_rate(lambda: store.stats(name))
    return compare("lookup", case, [subject, limit], batches, ctx.reps, expected=weights[batches[0].ids],
                   notes=lambda: {subject.system: hit_rate()})


def size_batch(plan: Plan) -> int:
    """The batch size the size sweep compares at (all its batch sizes for cached uniform ids)."""
    return plan.batches[-2] if len(plan.batches) > 1 else plan.batches[0]


def regimes_for(plan: Plan, dim: int, first: bool) -> list[str]:
    """Which tables of this dim the cases at this size read."""
    wanted = set()
    if first and dim == plan.dim:
        wanted |= set(plan.regimes)
    if first and dim in plan.dims:
        wanted.add("all")
    if dim == plan.size_dim:
        wanted |= {"all", "cold"}
    return [r for r in REGIMES if r in wanted]


def run_size(ctx: Context, plan: Plan, rows: int, first: bool) -> list[Record]:
    """All in-process cases on tables of `rows` rows."""
    tables = {dim: regimes_for(plan, dim, first) for dim in sorted({plan.size_dim, plan.dim, *plan.dims})}
    tables = {dim: regimes for dim, regimes in tables.items() if regimes}
    data_dir = ctx.tmpdir(f"lookup-{rows}-")
    records: list[Record] = []
    sampler = store_bench.IdSampler(rows, 1.05, seed=rows)
    with Store(str(data_dir), sweeper=SweeperConfig(enabled=False)) as store:
        arrays = {}
        for dim, regimes in tables.items():
            arrays[dim] = table_weights(rows, dim, seed=dim)
            load_store(store, arrays[dim], regimes)
        settle_compactions(store)
        families = tuple(store.table(table_name("cold", dim)).family for dim, regimes in tables.items()
                         if "cold" in regimes)
        raw, _ = store_bench.open_raw(store.rocks.path, read_only=True, families=families)
        try:
            for case, batches in cases_for_size(plan, rows, first, sampler):
                records += in_process_case(ctx, store, raw, arrays[case["dim"]], case, batches)
                ctx.log.add(records[-2:])
        finally:
            raw.close()
    return records


def cases_for_size(plan: Plan, rows: int, first: bool, sampler):
    """(case, batches) for one table size: the full matrix at the first size, the size sweep at every size."""
    seen = set()
    wanted = []
    if first:
        wanted += [("matrix", plan.dim, r, d, b) for r in plan.regimes for d in plan.dists for b in plan.batches]
        wanted += [("dims", dim, "all", "uniform", plan.batches[len(plan.batches) // 2]) for dim in plan.dims]
    wanted += [("sizes", plan.size_dim, r, d, b) for r in ("all", "cold") for d in plan.dists
               for b in (plan.batches if (r, d) == ("all", "uniform") else [size_batch(plan)])]
    for part, dim, regime, dist, batch in wanted:
        key = (dim, regime, dist, batch)
        if key in seen:
            continue
        seen.add(key)
        per_rep = plan.cold_rows_per_rep if regime == "cold" else plan.rows_per_rep
        case = {"part": part, "path": "in-process", "rows": rows, "dim": dim, "cache": regime, "dist": dist,
                "batch": batch}
        yield case, make_batches(sampler, dist, batch, per_rep)


def size_ratio(records: list[Record], plan: Plan, role: str, regime: str, dist: str) -> float | None:
    """Throughput at the largest table over the smallest, for one side of the size sweep."""
    by_size = {r.case["rows"]: r.value for r in records if r.role == role and r.case["path"] == "in-process"
               and r.case["dim"] == plan.size_dim and r.case["cache"] == regime and r.case["dist"] == dist
               and r.case["batch"] == size_batch(plan)}
    small, large = min(plan.sizes), max(plan.sizes)
    if small == large or small not in by_size or large not in by_size:
        return None
    return by_size[large] / by_size[small]


def scaling_notes(ctx: Context, plan: Plan, records: list[Record]) -> None:
    """Throughput at the largest table over the smallest (kvstore's, and its limit's on the same
    machine: random reads slow down with the working set), and the cost per row against batch size."""
    small, large = min(plan.sizes), max(plan.sizes)
    for regime in ("all", "cold"):
        for dist in plan.dists:
            ratio = size_ratio(records, plan, SUBJECT, regime, dist)
            limit = size_ratio(records, plan, LIMIT, regime, dist)
            if ratio is None:
                continue
            verdict = "quick run: not a measurement" if ctx.quick else "met" if ratio >= 0.8 else "MISSED"
            ctx.log.note("lookup", f"scaling, cache {regime}, {dist}: {large:,} rows at {ratio:.2f} of the "
                                   f"throughput at {small:,} rows (target >= 0.8: {verdict}); the limit's own "
                                   f"ratio {limit:.2f}")
    kv = [r for r in records if r.role == SUBJECT and r.case["path"] == "in-process"]
    for rows in plan.sizes:
        series = sorted((r.case["batch"], 1e9 / r.value) for r in kv if r.case["rows"] == rows and
                        r.case["cache"] == "all" and r.case["dist"] == "uniform" and r.case["dim"] == plan.size_dim)
        if len(series) > 1:
            text = ", ".join(f"{b:,}: {ns:.0f} ns" for b, ns in series)
            ctx.log.note("lookup", f"cost per row by batch, {rows:,} rows, cached, uniform: {text}")


def run(ctx: Context) -> list[Record]:
    plan = QUICK if ctx.quick else FULL
    if ctx.sizes:
        plan = replace(plan, sizes=sorted(ctx.sizes))
    records: list[Record] = []
    for i, rows in enumerate(sorted(plan.sizes)):
        records += run_size(ctx, plan, rows, first=i == 0)
    scaling_notes(ctx, plan, records)
    records += lookup_service.run(ctx, rows=min(plan.sizes), dim=plan.dim, batches=plan.batches[:1] +
                                  plan.batches[2:3], dists=plan.dists, per_rep=plan.cold_rows_per_rep)
    records += memory.run(ctx, dim=plan.dim, slots=32 * 1024 if ctx.quick else 1 << 20,
                          fills=(0.95,) if ctx.quick else memory.FILLS)
    return records
