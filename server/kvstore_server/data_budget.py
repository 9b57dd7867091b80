"""The data directory's disk budget, and the row limits imports count against.

`max_data_bytes` bounds the live database: its SST files plus its memtables (what the
WAL holds until they flush), read from RocksDB's properties, not by walking the
directory. Snapshots (hard links of SST files) and staged imports are not counted.
The figure is refreshed in the background every `REFRESH_SECONDS`, so checking it
costs a comparison; a burst of writes may pass the budget by what it adds in that time.

Past the budget, calls that add rows are refused with RESOURCE_EXHAUSTED naming it:
Update, Import and ImportChain, RestoreRows; ApplyGradients and Prefetch when a row is
missing; lookups with `init_insert` when an id is missing (present rows are still served).
A Train step's prefetches, a hint, are skipped.
Reads, Delete, DropTable and DeleteSnapshot keep working, so an operator can make room.
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable

import numpy as np

from kvstore import Store, TableConfig
from kvstore.errors import InvalidArgument, KVStoreError, ResourceExhausted, RowNotFound

REFRESH_SECONDS = 1.0
FILESYSTEM_SHARE = 0.8        # the default budget: this much of the data directory's file system
KEY_BYTES = 8


def default_data_budget(data_dir: str) -> int:
    """80% of the size of the file system holding `data_dir` (0: unknown, no budget)."""
    try:
        fs = os.statvfs(data_dir)
    except OSError:
        return 0
    return int(fs.f_blocks * fs.f_frsize * FILESYSTEM_SHARE)


def database_bytes(store: Store) -> int:
    """Live SST bytes and memtable bytes of every column family of the live database."""
    try:
        families = store.rocks.properties()
    except KVStoreError:        # closed, or being swapped by a restore: keep the last figure
        return -1
    return sum(props.get("live_sst_bytes", 0) + props.get("memtable_bytes", 0)
               for name, props in families.items() if name)


class DataBudget:
    """Whether the live database is past `limit` bytes (0 = no budget)."""

    def __init__(self, store: Store, limit: int):
        self.store = store
        self.limit = limit
        self.used = 0
        self._refreshing = threading.Lock()

    def refresh(self) -> int:
        """Read the database's size now (from a worker thread: RocksDB properties)."""
        with self._refreshing:
            used = database_bytes(self.store)
            if used >= 0:
                self.used = used
        return self.used

    async def refresh_forever(self, work: Callable[..., Awaitable[int]]) -> None:
        """The server's background task: the figure, every REFRESH_SECONDS, read in the store's pool."""
        while True:
            await work(self.refresh)
            await asyncio.sleep(REFRESH_SECONDS)

    @property
    def exhausted(self) -> bool:
        return bool(self.limit) and self.used > self.limit

    def room(self) -> int | None:
        """Bytes left before the budget (None: no budget)."""
        return max(0, self.limit - self.used) if self.limit else None

    def refusal(self, what: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"max_data_bytes: the database holds {self.used:,} bytes, over the data directory's budget of "
            f"{self.limit:,}; {what} would add rows. Reads, deletes and drops still work: delete rows, drop "
            "tables or raise max_data_bytes")

    def check(self, what: str) -> None:
        """ResourceExhausted naming the budget when it is exhausted."""
        if self.exhausted:
            raise self.refusal(what)

    def lookup(self, table: str, ids: np.ndarray, on_miss: str, with_state: bool, out: np.ndarray | None = None):
        """`store.lookup`; past the budget an `init_insert` serves present rows and refuses to create any."""
        if on_miss != "init_insert" or not self.exhausted:
            return self.store.lookup(table, ids, on_miss, with_state, out)
        try:
            return self.store.lookup(table, ids, "error", with_state, out)
        except RowNotFound:
            raise self.refusal("a lookup with on_miss init_insert of ids the table lacks") from None

    def require_present(self, table: str, ids: np.ndarray, what: str) -> None:
        """Past the budget: ResourceExhausted unless every id has a row (a read, nothing is created)."""
        if self.exhausted:
            try:
                self.store.lookup(table, ids, "error", False)
            except RowNotFound:
                raise self.refusal(what) from None

    def apply_gradients(self, table: str, ids: np.ndarray, *args):
        """`store.apply_gradients`; past the budget only when every row exists (a step creates missing ones)."""
        self.require_present(table, ids, "a gradient step on ids the table lacks")
        return self.store.apply_gradients(table, ids, *args)

    def prefetch(self, table: str, ids: np.ndarray, *args):
        """`store.prefetch`; past the budget only when every row exists (a prefetch stores missing ones)."""
        self.require_present(table, ids, "a prefetch of ids the table lacks")
        return self.store.prefetch(table, ids, *args)

    def check_import(self, stager) -> None:
        """The rows staged so far fit the table's `eviction.max_rows` and the disk budget's room."""
        max_rows = stager.table.config.eviction.max_rows
        if max_rows and stager.rows > max_rows:
            raise ResourceExhausted(
                f"eviction.max_rows: the import brings more than {max_rows:,} rows, the limit of table "
                f"{stager.table.name!r}; nothing was imported")
        room = self.room()
        size = stager.rows * (stager.layout.row_bytes + KEY_BYTES)
        if room is not None and size > room:
            raise ResourceExhausted(
                f"max_data_bytes: the import's {stager.rows:,} rows need about {size:,} bytes and the data "
                f"directory's budget of {self.limit:,} has {room:,} left; nothing was imported")


def with_default_max_rows(config: TableConfig, default_max_rows: int) -> TableConfig:
    """`config` with `eviction.max_rows` set to the server's default when it has none."""
    if not default_max_rows or config.eviction.max_rows:
        return config
    raw = config.to_dict()
    raw["eviction"] = {**raw.get("eviction", {}), "max_rows": default_max_rows}
    try:
        return TableConfig.from_dict(raw)
    except InvalidArgument as exc:
        raise InvalidArgument(f"default_max_rows: {exc}") from None
