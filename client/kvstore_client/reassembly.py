"""The result of one lookup, written in place as its answer chunks arrive.

Each chunk of an answer is a read-only view of the received bytes
(`decode_lookup_response`); it is copied once, straight to its rows' positions in
the request: a contiguous slice for one server, the shard's request positions for
a sharded lookup. No per-shard result array, no concatenation, no reorder copy.
The result is allocated when the first chunk tells its dtype and width; shard
threads then write disjoint rows of it concurrently (NumPy releases the GIL while
it copies).
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from .arrays import put_rows
from .errors import InternalError, InvalidArgumentError

# place(start, stop, weights, state): rows [start, stop) of one call's ids arrived
Place = Callable[[int, int, np.ndarray, "np.ndarray | None"], None]
# allocate(shape, dtype): a writable array for the result (np.empty, or pinned host memory)
Allocate = Callable[[tuple, np.dtype], np.ndarray]


class Reassembly:
    """Weights [n, dim] (and state [n, state_dim]) of n requested ids, in request order."""

    def __init__(self, n: int, with_state: bool = False, allocate: Allocate = np.empty,
                 out: np.ndarray | None = None):
        """`out`: the caller's array for the weights (checked here for its shape, and against the
        answer's width and dtype when the first chunk comes); else `allocate` makes one."""
        self.n = n
        self.with_state = with_state
        self.allocate = allocate
        self.out = None if out is None else _checked_out(out, n)
        self.weights: np.ndarray | None = None
        self.state: np.ndarray | None = None
        self._lock = threading.Lock()

    def sink(self, positions: np.ndarray | None = None) -> Place:
        """Where one call's chunks go: rows [start, stop) of the call land at positions[start:stop]
        of the result (at start:stop when `positions` is None)."""

        def place(start: int, stop: int, weights: np.ndarray, state: np.ndarray | None) -> None:
            if self.weights is None:
                self._allocate(weights, state)
            at = slice(start, stop) if positions is None else positions[start:stop]
            _put(self.weights, at, weights, "weights")
            if self.with_state:
                _put(self.state, at, state, "state")

        return place

    def result(self):
        """The weights, or (weights, state) with state; every chunk must have been placed."""
        if self.weights is None:
            raise InternalError(message="lookup: no answer chunk arrived")
        return (self.weights, self.state) if self.with_state else self.weights

    def _allocate(self, weights: np.ndarray, state: np.ndarray | None) -> None:
        with self._lock:
            if self.weights is not None:
                return
            if self.with_state:
                self.state = self.allocate((self.n, state.shape[1]), state.dtype)
            if self.out is not None and (self.out.shape[1] != weights.shape[1] or self.out.dtype != weights.dtype):
                raise InvalidArgumentError(message=f"out: expected a ({self.n}, {weights.shape[1]}) {weights.dtype} "
                                                   f"array for this table, got {self.out.shape} {self.out.dtype}")
            weights_out = self.out if self.out is not None else self.allocate((self.n, weights.shape[1]), weights.dtype)
            self.weights = weights_out                                                # published last


def _put(out: np.ndarray, at: slice | np.ndarray, rows: np.ndarray, field: str) -> None:
    if rows.shape[1:] != out.shape[1:] or rows.dtype != out.dtype:
        raise InternalError(message=f"lookup: answer {field} of {rows.dtype} {rows.shape[1:]} per row where "
                                    f"another answer had {out.dtype} {out.shape[1:]} (do the shards' tables differ?)")
    if isinstance(at, slice):
        out[at] = rows
    else:
        put_rows(out, at, rows)


def _checked_out(out: np.ndarray, n: int) -> np.ndarray:
    if not isinstance(out, np.ndarray) or out.ndim != 2 or len(out) != n or not out.flags.writeable:
        shape = getattr(out, "shape", None)
        raise InvalidArgumentError(message=f"out: expected a writable NumPy array of shape ({n}, dim), "
                                           f"got {type(out).__name__} of shape {shape}")
    return out
