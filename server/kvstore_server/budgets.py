"""Server-wide budgets checked when a table is created: how many tables, how much cache memory.

A table's host cache costs its slots times (row bytes + 56 bytes of per-slot metadata) once it
fills (docs/operations.md, "Memory"); the sum over tables must stay within `max_cache_bytes`,
by default half the machine's memory, so no CreateTable can promise more memory than there is.
A GPU table's cache lives in device memory and is not counted here; its host tier
(`cache.host_rows`) is.
"""
from __future__ import annotations

import os

from kvstore import Store, TableConfig
from kvstore.errors import KVStoreError, ResourceExhausted
from kvstore.rows import RowLayout

SLOT_METADATA_BYTES = 56


def machine_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def default_cache_budget() -> int:
    """Half the machine's memory (0 = unknown: no budget)."""
    return machine_memory_bytes() // 2


def host_slots(config: TableConfig) -> tuple[str, int]:
    """The field naming a table's host-memory cache slots, and how many: a host table's cache, or a
    GPU table's host tier (0 without one)."""
    if config.cache.device == "cpu":
        return "cache.rows", config.cache.rows
    return "cache.host_rows", config.cache.host_rows


def host_cache_bytes(config: TableConfig) -> int:
    return host_slots(config)[1] * (RowLayout.of(config).row_bytes + SLOT_METADATA_BYTES)


def check_new_table(store: Store, config: TableConfig, max_tables: int, max_cache_bytes: int) -> None:
    """ResourceExhausted, naming the limit, when `config` would take the server past a budget."""
    names = store.list_tables()
    if len(names) >= max_tables:
        raise ResourceExhausted(f"max_tables: the server holds {len(names)} tables, its limit; drop one first")
    if not max_cache_bytes:
        return
    used = 0
    for name in names:
        try:
            used += host_cache_bytes(store.describe_table(name))
        except KVStoreError:                  # dropped meanwhile: it no longer counts
            continue
    need = host_cache_bytes(config)
    if used + need > max_cache_bytes:
        field, slots = host_slots(config)
        raise ResourceExhausted(
            f"{field}: {slots} slots of table {config.name[:128]!r} need {need:,} bytes of host "
            f"memory; with the {used:,} bytes of the other tables' caches that is over max_cache_bytes "
            f"({max_cache_bytes:,}); give the table a smaller cache or raise max_cache_bytes")
