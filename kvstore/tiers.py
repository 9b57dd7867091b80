"""Cache tiers: the interface a `Table` drives, the host-memory tier, and the choice by config.

A tier is a set-associative cache of rows in their stored byte layout (header,
weights, optimizer state), with per-slot key, dirty bit, lock count and victim
stamps. Two implementations keep the same semantics: `HostTier` (NumPy and the
Numba loops of `host_kernels`, host memory) and `GpuTier` (CuPy kernels, GPU
memory, in `gpu_tier.py`). `make_tier` picks one from `cache.device`; shared
code never asks which one it has.

The boundary: ids, slots, masks and rows that cross it are host NumPy arrays,
so the table's logic (RocksDB, writer, eviction metadata, admission) is the
same for every tier. Rows a call is staging (a gradient step, an update) stay
in the tier's own memory as "staged rows" (`stage`, `step`, `publish`): on a
GPU the fused optimizer kernel steps them where they are and nothing crosses
PCIe but the gradients in and, for write-through tables, the rows out.
"""
from __future__ import annotations

import numpy as np

from .cache import SetAssociativeCache
from .config import CacheConfig, TableConfig
from .devices import device_index
from .errors import FailedPrecondition
from .eviction.rules import COUNT_WORD, touch_headers
from .host_kernels import gather_rows, probe_read_hits, read_hits
from .optimizers import make_optimizer, step_rows
from .rows import MAX_COUNT, RowLayout


class HostTier(SetAssociativeCache):
    """The cache tier in host memory. Its arrays are zero-filled by the OS page by page as
    slots are used (calloc), so memory grows with use up to the configured size."""

    gathers_to_device = False      # cached_columns' `out` is a NumPy array

    def __init__(self, config: CacheConfig, layout: RowLayout, optimizer):
        super().__init__(config, layout.row_bytes)
        self.layout = layout
        self.optimizer = optimizer

    # --- reads ----------------------------------------------------------------------

    def probe_and_touch(self, ids: np.ndarray, now: float) -> np.ndarray:
        """Slot of each id (-1: not cached); hits are stamped as used by this batch (so no
        eviction of the batch moves them) and their headers record the access."""
        slots = self.probe(ids)
        self.access(slots if (slots >= 0).all() else slots[slots >= 0], now)
        return slots

    def probe_touch_columns(self, ids: np.ndarray, now: float, with_state: bool, out: np.ndarray | None = None
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`probe_and_touch`, then `columns` of the slots found: a lookup's cached part in one
        call, first thing in its batch (a GPU tier answers it with one trip across PCIe instead
        of two; here the access and the gather are one pass, `host_kernels.read_hits`). The
        weights go into `out` when given ([n, dim] of the table's dtype)."""
        slots = self.probe(ids)
        return (slots, *self._read_hits(slots, now, with_state, out))

    def cached_columns(self, ids: np.ndarray, now: float, with_state: bool, out: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """A lookup that finds every id cached: a new batch, the access recorded, the columns
        gathered (the weights into `out`, [n, dim] of the table's dtype, when given). None, with
        nothing changed, when any id is not cached (the probe is pure). The access and the
        gather are one pass over the rows (`host_kernels.read_hits`)."""
        layout = self.layout
        weights, state = self._outputs(len(ids), with_state, out)
        slots = probe_read_hits(self.probing(), ids, self.slab, COUNT_WORD, MAX_COUNT, int(now), self.last_used,
                                self.tick + 1, self.uses, (layout.weight_offset, weights),
                                (layout.state_offset, state) if with_state else None)
        if slots is None:
            return None
        self.begin_batch()                                  # the batch read_hits stamped
        return weights, state

    def _read_hits(self, slots: np.ndarray, now: float, with_state: bool, out: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
        """The access of a batch's cached slots recorded and their columns gathered (rows of
        slot -1 left unwritten), in one pass."""
        layout = self.layout
        weights, state = self._outputs(len(slots), with_state, out)
        read_hits(self.slab, COUNT_WORD, MAX_COUNT, int(now), self.last_used, self.tick, self.uses, slots,
                  (layout.weight_offset, weights), (layout.state_offset, state) if with_state else None)
        return weights, state

    def _outputs(self, n: int, with_state: bool, out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Where a lookup of n rows puts its weights (`out`, or a new array) and, if asked, its state."""
        layout = self.layout
        weights = np.empty((n, layout.dim), layout.dtype) if out is None else out
        return weights, np.empty((n, layout.state_dim), np.float32) if with_state else None

    def access(self, slots: np.ndarray, now: float) -> None:
        """A use of cached slots: stamps, and count + 1 / last_access in headers (duplicates once)."""
        self.touch(slots)
        if len(slots):
            touch_headers(self.slab, slots, int(now))

    def columns(self, slots: np.ndarray, with_state: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """New contiguous weights (and state) of `slots`; rows of slot -1 hold garbage. Each column
        is one gather of that column's bytes (`host_kernels.gather_rows`): each row's bytes are
        copied once, straight to their place (taking whole rows first and copying the column
        out of them costs a second copy, about 1.4x the time)."""
        layout = self.layout
        weights = self._column(slots, layout.weight_offset, layout.dim, layout.dtype)
        state = self._column(slots, layout.state_offset, layout.state_dim, np.dtype(np.float32)) if with_state else None
        return weights, state

    def _column(self, slots: np.ndarray, offset: int, width: int, dtype: np.dtype) -> np.ndarray:
        nbytes = width * dtype.itemsize
        if not nbytes:
            return np.empty((len(slots), width), dtype)
        return gather_rows(self.slab, slots, offset, nbytes).view(dtype)

    def rows(self, slots: np.ndarray) -> np.ndarray:
        """A host copy of the rows in `slots` ([n, row_bytes])."""
        return self.take_rows(slots)

    def headers(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(last_access, count) of the rows in `slots`."""
        header = self.layout.header(self.slab)
        return header["last_access"][slots], header["count"][slots]

    # --- changes of cached rows --------------------------------------------------------

    def write_rows(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """Host rows into cached slots (whole records through `put`)."""
        self.put_rows(slots, rows)

    # --- staged rows: a call's rows, computed before anything is published ----------------

    def stage(self, slots: np.ndarray) -> np.ndarray:
        """Staged copies of the rows in `slots`; rows of slot -1 are empty (set them with `load`)."""
        if (slots >= 0).all():
            return self.rows(slots)
        rows = self.layout.empty(len(slots))
        hit = np.flatnonzero(slots >= 0)
        rows[hit] = self.take_rows(slots[hit])
        return rows

    def load(self, staged: np.ndarray, index: np.ndarray, rows: np.ndarray) -> None:
        """Host `rows` into staged rows `index`."""
        staged[index] = rows

    def from_host(self, rows: np.ndarray) -> np.ndarray:
        """Host rows as staged rows (here: themselves)."""
        return rows

    def select(self, staged: np.ndarray, index: np.ndarray) -> np.ndarray:
        return staged[index]

    def to_host(self, staged: np.ndarray) -> np.ndarray:
        return staged

    def set_columns(self, staged: np.ndarray, weights: np.ndarray, state: np.ndarray | None) -> None:
        self.layout.weights(staged)[:] = weights
        if state is not None:
            self.layout.state(staged)[:] = state

    def set_scores(self, staged: np.ndarray, bits: np.ndarray) -> None:
        self.layout.header(staged)["score"] = bits

    def touch_staged(self, staged: np.ndarray, now: float) -> None:
        """A write is an access: count + 1, last_access = now in every staged row."""
        header = self.layout.header(staged)
        header["last_access"] = int(now)
        header["count"] += 1

    def step(self, staged: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """One optimizer step on staged rows with float32 `grads`; returns which rows now hold
        NaN or Inf (the caller refuses the call when its table does not allow them)."""
        step_rows(self.optimizer, self.layout, staged, grads)
        weights, state = self.layout.weights(staged), self.layout.state(staged)
        with np.errstate(over="ignore", invalid="ignore"):
            finite = bool(np.isfinite(weights.sum()) and np.isfinite(state.sum()))
        if finite:
            # NaN and Inf carry through a sum, so a finite total proves every row finite (about half
            # the cost of the per-row test, which runs only when a sum is not finite: a bad row, or
            # finite values whose total overflowed)
            return np.zeros(len(staged), dtype=bool)
        return ~(np.isfinite(weights).all(axis=1) & np.isfinite(state).all(axis=1))

    def publish(self, slots: np.ndarray, staged: np.ndarray) -> None:
        """Staged rows into their cached slots (every slot >= 0)."""
        self.write_rows(slots, staged)

    def step_cached(self, ids: np.ndarray, grads: np.ndarray, now: float, refuse_nonfinite: bool
                    ) -> np.ndarray | None:
        """One optimizer step of unique ids that are all cached, kept in the cache until a flush
        (write_back): a new batch, the access recorded, the slots marked dirty. Returns which rows
        the step left holding NaN or Inf; with `refuse_nonfinite` and any such row the cache is
        left as it was, stamps included. None, with nothing changed, when an id is not cached
        (the probe is pure)."""
        slots = self.probe(ids)
        if not bool((slots >= 0).all()):
            return None
        staged = self.stage(slots)
        bad = self.step(staged, grads)
        if refuse_nonfinite and bad.any():
            return bad
        self.begin_batch()
        self.touch(slots)
        self.touch_staged(staged, now)
        self.publish(slots, staged)
        self.set_dirty(slots, True)
        return bad


def make_tier(config: TableConfig, layout: RowLayout):
    """The cache tier `config.cache.device` names: host memory, or a GPU's memory."""
    optimizer = make_optimizer(config.optimizer, config.dim)
    device = config.cache.device
    if device == "cpu":
        return HostTier(config.cache, layout, optimizer)
    try:
        from .gpu_tier import GpuTier
    except ImportError as exc:
        raise FailedPrecondition(f"cache.device: {device!r} needs CuPy with a CUDA device ({exc})") from None
    return GpuTier(config.cache, layout, config.optimizer, device_index(device))

