"""Deterministic initial rows: a pure function of (table seed, id, column).

The same id gets the same initial row on any shard and after any restart, so
lookups with `init` and `init_insert` agree everywhere without coordination.
Counter-based hashing (splitmix64) keeps it vectorized: no RNG state.
"""
from __future__ import annotations

import numpy as np

from .config import InitializerConfig

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _uniform01(ids: np.ndarray, dim: int, seed: int, stream: int) -> np.ndarray:
    """[n, dim] float64 in (0, 1), independent per (seed, stream, id, column)."""
    with np.errstate(over="ignore"):
        base = splitmix64(ids.astype(np.int64).view(np.uint64) ^ splitmix64(np.uint64(seed) + np.uint64(stream)))
        counter = base[:, None] + np.arange(dim, dtype=np.uint64)[None, :] * _GOLDEN
    bits = splitmix64(counter) >> np.uint64(11)          # 53 random bits
    return (bits.astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def initial_weights(config: InitializerConfig, ids: np.ndarray, dim: int) -> np.ndarray:
    """[n, dim] float64 initial weights for `ids` (cast to the table dtype by the caller)."""
    if config.kind == "zeros" or len(ids) == 0:
        return np.zeros((len(ids), dim), dtype=np.float64)
    if config.kind == "uniform":
        return (_uniform01(ids, dim, config.seed, 0) * 2.0 - 1.0) * config.scale
    # normal: Box-Muller over two independent uniform streams
    u1 = _uniform01(ids, dim, config.seed, 1)
    u2 = _uniform01(ids, dim, config.seed, 2)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2) * config.scale
