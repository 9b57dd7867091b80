"""Calls that raced a table drop end NOT_FOUND or FAILED_PRECONDITION naming the table, not INTERNAL.

A lookup, write or snapshot that was running when a table was dropped can fail
deep in the store (a column family gone from under a read, a flush of a table
being removed). The store reports such failures as whatever its tier raised;
here, after an unexpected error or a storage error, the server checks whether
the table it was working on (or any table, for a snapshot) went away meanwhile,
and if so says so. A storage error on a table that still exists stays a storage
error: then storage did fail.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from kvstore import Store
from kvstore.errors import FailedPrecondition, KVStoreError, StorageError, TableNotFound

T = TypeVar("T")


def _unexpected(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and (isinstance(exc, StorageError) or not isinstance(exc, KVStoreError))


def _incarnation(store: Store, table: str) -> str | None:
    """The column family of `table`'s current incarnation (None: no such table). A table dropped and
    created again under its name during a call has another one."""
    try:
        return store.table(table).family
    except KVStoreError:
        return None


def _incarnations(store: Store) -> set[tuple[str, str | None]]:
    return {(name, _incarnation(store, name)) for name in store.list_tables()}


def on_table(store: Store, table: str, fn: Callable[..., T], *args: Any, before: str | None = None) -> T:
    """`fn(*args)`, work on `table`; an unexpected failure of a table dropped meanwhile (even if created
    again since) is TableNotFound. `before`: the table's incarnation (`Table.family`), when the
    caller has just looked the table up."""
    before = before or _incarnation(store, table)
    try:
        return fn(*args)
    except Exception as exc:
        if _unexpected(exc) and (before is None or _incarnation(store, table) != before):
            raise TableNotFound(f"table: {table[:128]!r} was dropped during the call") from exc
        raise


def across_tables(store: Store, what: str, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, work on every table; an unexpected failure while tables were dropped or created
    is FailedPrecondition naming them (the call left nothing behind and may be retried)."""
    before = _incarnations(store)
    try:
        return fn(*args)
    except Exception as exc:
        if not _unexpected(exc):
            raise
        changed = sorted(name for name, _ in before ^ _incarnations(store))
        if not changed:
            raise
        raise FailedPrecondition(f"{what}: table {changed[0][:128]!r} was dropped or created during the call; "
                                 "nothing was kept; retry") from exc
