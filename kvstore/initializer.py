"""Deterministic initial rows: a pure function of (table seed, id, column).

The same id gets the same initial row on any shard and after any restart, so
lookups with `init` and `init_insert` agree everywhere without coordination.
Counter-based hashing (splitmix64): no RNG state, one compiled pass over the rows.
"""
from __future__ import annotations

import numpy as np

from .config import InitializerConfig
from .host_kernels import initial_values

GOLDEN = np.uint64(0x9E3779B97F4A7C15)      # splitmix64's constants (host_loops uses them too)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x) -> np.ndarray:
    """splitmix64 of each value of `x` (uint64), as a new array (a scalar for a scalar)."""
    z = np.array(x, dtype=np.uint64, ndmin=1) + GOLDEN      # an array even for one value: mixed in place
    _mix(z)
    return z if np.ndim(x) else z[0]


def _mix(z: np.ndarray) -> None:
    """splitmix64's output mix, in place: one scratch array instead of a temporary per step."""
    scratch = np.empty_like(z)
    with np.errstate(over="ignore"):
        for shift, multiplier in ((30, MIX1), (27, MIX2)):
            np.right_shift(z, np.uint64(shift), out=scratch)
            z ^= scratch
            z *= multiplier
        np.right_shift(z, np.uint64(31), out=scratch)
        z ^= scratch


def write_initial(config: InitializerConfig, ids: np.ndarray, out: np.ndarray) -> None:
    """The initial weights of `ids` written into `out` ([n, dim], any strides: a table's rows in
    place), cast to its dtype. Column j of an id draws u = (top 53 bits of splitmix64(base +
    (j + 1) * golden) + 0.5) / 2^53 in (0, 1), base = splitmix64(id ^ splitmix64(seed + stream)):
    - uniform: (u * 2 - 1) * scale, stream 0;
    - normal: Box-Muller over streams 1 and 2, sqrt(log(u1) * -2) * cos(u2 * 2 pi) * scale.
    Each formula runs in this order of float64 steps in one compiled pass (`host_kernels`):
    uniform rows have the bits NumPy's passes gave (pinned by a test); normal rows may differ
    from them in the last bit of log and cos, as NumPy's own vector code does between CPUs."""
    if config.kind == "zeros" or not len(ids):
        out[...] = 0
        return
    streams = (0,) if config.kind == "uniform" else (1, 2)
    with np.errstate(over="ignore"):                          # a seed near 2^64 wraps, as it always did
        keys = tuple(splitmix64(np.uint64(config.seed) + np.uint64(stream)) for stream in streams)
    target = out if out.dtype in (np.float32, np.float64) else np.empty(out.shape, np.float64)
    initial_values(config.kind, ids, keys, config.scale, target)
    if target is not out:
        out[...] = target


def initial_weights(config: InitializerConfig, ids: np.ndarray, dim: int) -> np.ndarray:
    """[n, dim] float64 initial weights for `ids` (`write_initial`)."""
    weights = np.empty((len(ids), dim), dtype=np.float64)
    write_initial(config, ids, weights)
    return weights
