"""The store: tables over one RocksDB database in a data directory.

`Store` is the in-process API (library users call it directly) and the one
thing the gRPC server wraps. Table configs persist in the database beside the
rows, so reopening a data directory brings every table back as it was.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable

from .config import RocksConfig, SweeperConfig, TableConfig, validate_name
from .errors import FailedPrecondition, StoreClosed, TableExists, TableNotFound
from .eviction import archive
from .eviction.sweeper import Sweeper
from .rocks_tier import RocksTier
from .table import LookupResult, Table, open_table

DB_DIR = "db"


class Store:
    def __init__(self, data_dir: str, rocks: RocksConfig | None = None,
                 clock: Callable[[], float] = time.time, sweeper: SweeperConfig | None = None):
        self.data_dir = os.path.abspath(data_dir)
        self.clock = clock
        self.rocks = RocksTier(os.path.join(self.data_dir, DB_DIR), rocks)
        self._lock = threading.RLock()   # guards the table map
        self._tables: dict[str, Table] = {}
        self._closed = False
        for name, blob in self.rocks.load_configs().items():
            config = TableConfig.from_dict(json.loads(blob))
            self._tables[name] = open_table(config, self.rocks, clock)
        self.sweeper = Sweeper(lambda: list(self._tables.values()), sweeper, clock)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- tables ----------------------------------------------------------------

    def create_table(self, config: TableConfig) -> TableConfig:
        with self._lock:
            self._check_open()
            if config.name in self._tables:
                raise TableExists(f"name: table {config.name!r} already exists")
            self.rocks.create_family(config.name)
            self.rocks.save_config(config.name, json.dumps(config.to_dict()).encode())
            self._tables[config.name] = open_table(config, self.rocks, self.clock)
            return config

    def drop_table(self, name: str) -> None:
        with self._lock:
            table = self.table(name)
            table.eviction.cancelled.set()          # a sweep in progress stops at its next chunk
            with table.eviction.sweep_lock, table._lock:
                self.rocks.save_config(name, None)
                self.rocks.drop_family(name)
                self.rocks.drop_family(archive.archive_family(name))
                del self._tables[name]

    def list_tables(self) -> list[str]:
        with self._lock:
            return sorted(self._tables)

    def describe_table(self, name: str) -> TableConfig:
        return self.table(name).config

    def table(self, name: str) -> Table:
        self._check_open()
        validate_name(name, "table")
        try:
            return self._tables[name]
        except KeyError:
            raise TableNotFound(f"table: no table named {name!r}") from None

    # --- rows --------------------------------------------------------------------

    def lookup(self, table: str, ids, on_miss: str = "init_insert", with_state: bool = False) -> LookupResult:
        return self.table(table).lookup(ids, on_miss, with_state)

    def update(self, table: str, ids, weights, state=None, scores=None) -> int:
        return self.table(table).update(ids, weights, state, scores)

    def delete(self, table: str, ids) -> int:
        return self.table(table).delete(ids)

    def apply_gradients(self, table: str, ids, grads, owner: str | None = None, scores=None) -> int:
        return self.table(table).apply_gradients(ids, grads, owner, scores)

    def prefetch(self, table: str, ids, lock: bool = False, owner: str = "") -> int:
        return self.table(table).prefetch(ids, lock, owner)

    def release(self, table: str, ids, owner: str = "") -> int:
        return self.table(table).release(ids, owner)

    def release_owner(self, owner: str) -> int:
        """Unpin every row `owner` holds in any table (its client disconnected)."""
        with self._lock:
            tables = list(self._tables.values())
        return sum(t.release_all(owner) for t in tables)

    def stats(self, table: str) -> dict[str, float]:
        return self.table(table).stats()

    # --- eviction ----------------------------------------------------------------

    def evict(self, table: str) -> dict[str, int]:
        """Run one eviction sweep of `table` now (at the sweeper's rate); rows evicted by reason."""
        return self.sweeper.sweep(self.table(table)).counts()

    def restore_rows(self, table: str, ids) -> int:
        """Bring archived rows of `ids` back (ids that have a row again are left alone); rows restored."""
        handle = self.table(table)
        if not handle.config.eviction.archive_seconds:
            raise FailedPrecondition(f"table: {table!r} keeps no archive (eviction.archive_seconds is 0)")
        return archive.restore(handle, handle._ids(ids), self.clock())

    # --- lifecycle ---------------------------------------------------------------

    def flush(self) -> int:
        """Write every dirty cached row to RocksDB and flush memtables."""
        with self._lock:
            self._check_open()
            written = sum(t.flush() for t in self._tables.values())
            self.rocks.flush()
            return written

    def close(self) -> None:
        """Flush dirty rows and close the database; later calls fail with StoreClosed."""
        with self._lock:
            if self._closed:
                return
            self.sweeper.close()
            self.flush()
            self._closed = True
            self.rocks.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("store: closed")
