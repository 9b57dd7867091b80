"""The archive: evicted rows kept for `archive_seconds` in a column family of their own.

Value layout: archived-at time (float64 unix seconds, little-endian) then the
row in its stored layout, so restoring a row is a copy of bytes. The family
is named `archive/<table>`; '/' never occurs in table names, so it cannot
collide with a table.
"""
from __future__ import annotations

import numpy as np

from ..rows import decode_keys

_STAMP = 8


def archive_family(table: str) -> str:
    return f"archive/{table}"


def encode(rows: np.ndarray, now: float) -> list[bytes]:
    stamp = np.float64(now).tobytes()
    return [stamp + row.tobytes() for row in rows]


def decode(values: list[bytes], row_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(archived-at times [n], rows [n, row_bytes]) of archive values."""
    flat = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), _STAMP + row_bytes)
    return flat[:, :_STAMP].copy().view("<f8")[:, 0], flat[:, _STAMP:].copy()


def purge(table, limiter, now: float, chunk_rows: int, stopped) -> int:
    """Delete archived rows older than the retention; returns rows purged."""
    family = archive_family(table.name)
    retention = table.config.eviction.archive_seconds
    purged, start = 0, None
    while not stopped():
        keys, values = table.rocks.scan(family, start, chunk_rows)
        if not keys:
            break
        start = keys[-1] + b"\0"
        limiter.acquire(len(keys))
        times, _ = decode(values, table.layout.row_bytes)
        expired = [k for k, t in zip(keys, times, strict=True) if t < now - retention]
        table.rocks.write(family, [], delete=expired)
        purged += len(expired)
    return purged


def restore(table, ids: np.ndarray, now: float) -> int:
    """Put archived rows of `ids` back into the table, unless the id has a row again (a live
    row is never overwritten). Restored rows count as accessed now. Returns rows restored."""
    from ..rows import encode_keys

    ids = np.unique(ids)
    family = archive_family(table.name)
    with table._lock:
        ids = ids[~table._existing(ids)]
        keys = encode_keys(ids)
        values = table.rocks.get(family, keys)
        found = [i for i, v in enumerate(values) if v is not None]
        if not found:
            return 0
        _, rows = decode([values[i] for i in found], table.layout.row_bytes)
        table.layout.header(rows)["last_access"] = int(now)
        found_keys = [keys[i] for i in found]
        table.rocks.write(table.name, found_keys, table.layout.to_values(rows))
        table.rocks.write(family, [], delete=found_keys)
        table.changes.record(table.name, ids[found])
        table.eviction.created(len(found))
        table.counters["rows_restored"] += len(found)
        return len(found)


def archived_ids(table) -> np.ndarray:
    """Every id in the archive (for tests and operators; scans the whole family)."""
    keys, _ = table.rocks.scan(archive_family(table.name), None, 1 << 62)
    return decode_keys(keys) if keys else np.zeros(0, np.int64)
