"""Which cache devices this machine has, and where a table made elsewhere is placed here.

A table's rows live in RocksDB; its cache device is a placement. A table whose
config names a GPU this machine lacks (a data directory moved off a GPU host, an
export or a primary from one) still opens: its cache goes to host memory, with one
warning naming the table, and its stored config keeps the device.
"""
from __future__ import annotations

import dataclasses
import logging

from .config import TableConfig

log = logging.getLogger(__name__)


def device_index(device: str) -> int:
    """'cuda' -> 0, 'cuda:N' -> N (the device names CacheConfig accepts)."""
    _, _, index = device.partition(":")
    return int(index or 0)


def missing_device(device: str) -> str | None:
    """Why `device` cannot hold a cache on this machine, in a few words (None: it can)."""
    if device == "cpu":
        return None
    try:
        import cupy
    except Exception:        # not installed, or its CUDA libraries do not load
        return "CuPy not installed"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:        # no driver: CuPy raises its runtime error
        count = 0
    if device_index(device) >= count:
        return f"{count} CUDA device{'' if count == 1 else 's'}"
    return None


def placed_here(config: TableConfig) -> TableConfig:
    """`config`, or when its cache device is missing here, the same table with a host-memory cache:
    its host tier's slots and policy when it has one, else the GPU tier's."""
    reason = missing_device(config.cache.device)
    if reason is None:
        return config
    cache = config.cache.host_tier() or dataclasses.replace(config.cache, device="cpu")
    log.warning("table %r: cache.device %r is not available (%s); its cache is in host memory instead "
                "(%d rows, cache.device 'cpu'); its rows are in RocksDB and nothing is lost",
                config.name, config.cache.device, reason, cache.rows)
    return dataclasses.replace(config, cache=cache)
