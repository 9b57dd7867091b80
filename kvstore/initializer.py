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


def splitmix64(x) -> np.ndarray:
    """splitmix64 of each value of `x` (uint64), as a new array (a scalar for a scalar)."""
    z = np.array(x, dtype=np.uint64, ndmin=1) + _GOLDEN      # an array even for one value: mixed in place
    _mix(z)
    return z if np.ndim(x) else z[0]


def _mix(z: np.ndarray) -> None:
    """splitmix64's output mix, in place: one scratch array instead of a temporary per step
    (the initializer mixes n x dim counters, so each pass saved is a pass over all of them)."""
    scratch = np.empty_like(z)
    with np.errstate(over="ignore"):
        for shift, multiplier in ((30, _M1), (27, _M2)):
            np.right_shift(z, np.uint64(shift), out=scratch)
            z ^= scratch
            z *= multiplier
        np.right_shift(z, np.uint64(31), out=scratch)
        z ^= scratch


def _uniform01(ids: np.ndarray, dim: int, seed: int, stream: int) -> np.ndarray:
    """[n, dim] float64 in (0, 1), independent per (seed, stream, id, column)."""
    with np.errstate(over="ignore"):
        base = splitmix64(ids.astype(np.int64).view(np.uint64) ^ splitmix64(np.uint64(seed) + np.uint64(stream)))
        counters = base[:, None] + np.arange(dim, dtype=np.uint64)[None, :] * _GOLDEN
        counters += _GOLDEN                                  # splitmix64 of the counters, in place
    _mix(counters)
    counters >>= np.uint64(11)                               # 53 random bits
    values = counters.astype(np.float64)
    values += 0.5
    values *= 1.0 / (1 << 53)
    return values


def initial_weights(config: InitializerConfig, ids: np.ndarray, dim: int) -> np.ndarray:
    """[n, dim] float64 initial weights for `ids` (cast to the table dtype by the caller).
    Every step runs in place, in the order of the formulas: the same bits as written out."""
    if config.kind == "zeros" or len(ids) == 0:
        return np.zeros((len(ids), dim), dtype=np.float64)
    if config.kind == "uniform":
        weights = _uniform01(ids, dim, config.seed, 0)       # (u * 2 - 1) * scale
        weights *= 2.0
        weights -= 1.0
        weights *= config.scale
        return weights
    # normal: Box-Muller over two independent uniform streams, sqrt(-2 log u1) * cos(2 pi u2) * scale
    radius = _uniform01(ids, dim, config.seed, 1)
    np.log(radius, out=radius)
    radius *= -2.0
    np.sqrt(radius, out=radius)
    angle = _uniform01(ids, dim, config.seed, 2)
    angle *= 2.0 * np.pi
    np.cos(angle, out=angle)
    radius *= angle
    radius *= config.scale
    return radius
