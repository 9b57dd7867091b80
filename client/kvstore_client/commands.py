"""The `kvstore` commands that ask and print: tables, describe, stats, health, snapshots.

Listings print a header and aligned columns for people, or with `--json` one JSON
document for scripts. An empty listing prints nothing on stdout (so `| wc -l` counts
rows) and says so on stderr (`no tables`). Counters that are whole numbers print as
integers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from .client import KVStoreClient
from .progress import Progress


def number(value: float) -> int | float:
    """A counter as people read it: 1000000, not 1e+06; fractions keep their digits."""
    return int(value) if float(value).is_integer() else value


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


def print_table(header: Sequence[str], rows: list[Sequence[Any]], empty: str) -> None:
    """Columns aligned under a header; `empty` on stderr when there are no rows."""
    if not rows:
        print(empty, file=sys.stderr)
        return
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


# --- tables --------------------------------------------------------------------------------

TABLE_COLUMNS = ("NAME", "DIM", "DTYPE", "OPTIMIZER", "CACHE_ROWS", "CACHE_POLICY", "WRITE", "DEVICE", "HOST_ROWS")


def shown_config(config: dict) -> dict:
    """A table config as operators read it: the host tier's fields only when the table has one."""
    cache = dict(config["cache"])
    if not cache.get("host_rows"):
        cache.pop("host_rows", None)
        cache.pop("host_policy", None)
    return {**config, "cache": cache}


def list_tables(client: KVStoreClient, args: argparse.Namespace) -> int:
    configs = [shown_config(client.describe_table(name)) for name in client.list_tables()]
    if args.json:
        print_json(configs)
        return 0
    rows = [(c["name"], c["dim"], c["dtype"] or "float32", c["optimizer"]["name"] or "sgd", c["cache"]["rows"],
             c["cache"]["policy"] or "lru", c["cache"]["write"] or "write_back", c["cache"]["device"] or "-",
             c["cache"].get("host_rows", "-")) for c in configs]
    print_table(TABLE_COLUMNS, rows, "no tables")
    return 0


def describe_table(client: KVStoreClient, args: argparse.Namespace) -> int:
    print_json(shown_config(client.describe_table(args.table)))
    return 0


def table_stats(client: KVStoreClient, args: argparse.Namespace) -> int:
    counters = {name: number(value) for name, value in client.stats(args.table).items()}
    if args.json:
        print_json(counters)
    else:
        for name, value in sorted(counters.items()):
            print(f"{name}\t{value}")
    return 0


def check_health(client: KVStoreClient, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


# --- snapshots -----------------------------------------------------------------------------

SNAPSHOT_COLUMNS = ("NAME", "CREATED", "ROWS", "TABLES")


def snapshot_create(client: KVStoreClient, args: argparse.Namespace) -> int:
    info = client.create_snapshot(args.name)
    print(f"snapshot {info['name']}: {sum(info['rows'].values()):,} rows (estimated) in {len(info['tables'])} "
          f"tables; writes paused {1000 * info['pause_seconds']:.1f} ms, took {info['duration_seconds']:.2f} s")
    return 0


def snapshot_list(client: KVStoreClient, args: argparse.Namespace) -> int:
    snapshots = client.list_snapshots()
    if args.json:
        print_json([{"name": s["name"], "created_at": s["created_at"], "rows": s["rows"],
                     "tables": sorted(s["rows"]), "pause_seconds": s["pause_seconds"],
                     "duration_seconds": s["duration_seconds"], "format_version": s["format_version"]}
                    for s in snapshots])
        return 0
    rows = [(s["name"], time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(s["created_at"])),
             sum(s["rows"].values()), ",".join(sorted(s["rows"])) or "-") for s in snapshots]
    print_table(SNAPSHOT_COLUMNS, rows, "no snapshots")
    return 0


def snapshot_restore(client: KVStoreClient, args: argparse.Namespace) -> int:
    progress = Progress(f"restore {args.name}", enabled=not args.quiet)
    info = progress.wait(lambda: client.restore_snapshot(args.name))
    print(f"restored snapshot {info['name']} in {info['restore_seconds']:.2f} s")
    return 0


def snapshot_delete(client: KVStoreClient, args: argparse.Namespace) -> int:
    client.delete_snapshot(args.name)
    print(f"deleted snapshot {args.name}")
    return 0
