"""The CUDA kernels of the GPU cache tier (native/*.cu) and their launches.

The source is compiled through `cupy.RawModule` (NVRTC; CuPy also keeps compiled
modules on disk): once per process and device for the cache's kernels, and once
more for each (weight type, optimizer) a table steps with, with only that pair's
fused-step templates in it. Compiling every pair at once took 43 s on an H200 with
an empty disk cache, longer than a client waits for its first CreateTable; one
pair takes about 5 s. Launch helpers here take
CuPy arrays and plain Python numbers and pass every scalar with its exact C
type, so a kernel never reads a wrongly sized argument.
"""
from __future__ import annotations

import functools

import cupy
import numpy as np

from .config import OptimizerConfig
from .gpu_sources import (
    COPY_ROWS_IN_FLIGHT,
    COPY_TYPES,
    OPTIMIZER_CODES,
    OPTIONS,
    PROBE_TYPES,
    STEP_ROWS_IN_FLIGHT,
    WEIGHT_TYPES,
    cache_names,
    source,
    step_name,
    step_names,
)
from .optimizers import bias_correction_table

THREADS = 256
ADAMS = ("adam", "partial_rowwise_adam")   # the steps with bias corrections
EXPONENTS = {"float32": (4, 0x7F800000), "float64": (8, 0x7FF0000000000000),   # size, exponent mask
             "float16": (2, 0x7C00), "bfloat16": (2, 0x7F80)}
STEP_WAVES = 16                      # the step's grid: up to this many full waves of blocks (see __init__)
NULL = np.uint64(0)                  # a null pointer argument

# probe flags (see the kernel)
TOUCH, LINK, ALL_NEW, COUNT_USES, HEADERS, MARK = 1, 2, 4, 8, 16, 32


def _compiled(device_id: int, names: list[str]) -> cupy.RawModule:
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=source(), options=OPTIONS, name_expressions=names)
        module.compile()
        return module


@functools.cache
def _module(device_id: int) -> cupy.RawModule:
    """The cache's kernels (probes, copies, duplicate sums, victims, metadata)."""
    return _compiled(device_id, cache_names())


@functools.cache
def _step_module(device_id: int, weight: str, code: int) -> cupy.RawModule:
    """The fused optimizer steps of one weight type and optimizer (with and without vector
    moves and duplicate segments)."""
    return _compiled(device_id, step_names(weight, code))


@functools.cache
def _step_function(device_id: int, weight: str, code: int, vec: bool, seg: bool):
    return _step_module(device_id, weight, code).get_function(step_name(weight, code, vec, seg))


@functools.lru_cache(maxsize=16)
def _bias_table(device_id: int, lr: float, beta1: float, beta2: float) -> cupy.ndarray | None:
    """Adam's bias corrections by step count on the device (`optimizers.bias_correction_table`)."""
    table = bias_correction_table(OptimizerConfig(name="adam", lr=lr, beta1=beta1, beta2=beta2))
    if table is None:
        return None
    with cupy.cuda.Device(device_id):
        return cupy.asarray(table)


@functools.cache
def _sm_count(device_id: int) -> int:
    return cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"]


def _ptr(array) -> np.uint64 | cupy.ndarray:
    return NULL if array is None else array


class Kernels:
    """Launchers for one device."""

    def __init__(self, device_id: int):
        self.device_id = device_id
        self.module = _module(device_id)
        self._functions: dict[str, object] = {}    # a CuPy lookup costs each launch a driver call
        self.max_blocks = _sm_count(device_id) * (2048 // THREADS) * 4
        # The fused steps wait on memory more than the other kernels: a grid of 16 waves, one row a warp,
        # ran SGD, rowwise Adagrad and both Adams 3-25% faster on an H200 than 4 waves of two rows, Adagrad
        # the same (docs/benchmarks.md, stop 31).
        self.step_blocks = _sm_count(device_id) * (2048 // THREADS) * STEP_WAVES
        self.copy_rows_in_flight = COPY_ROWS_IN_FLIGHT

    def _fn(self, name: str):
        function = self._functions.get(name)
        if function is None:
            function = self._functions[name] = self.module.get_function(name)
        return function

    def _grid(self, threads_needed: int, max_blocks: int | None = None) -> tuple[int]:
        """Blocks for a grid-stride loop: at most `max_blocks` (default `self.max_blocks`), and as
        few as give every block the same number of rounds (no last round with most of the grid idle)."""
        blocks = max(1, -(-threads_needed // THREADS))
        rounds = -(-blocks // (max_blocks or self.max_blocks))
        return (-(-blocks // rounds),)

    def probe(self, keys, occupied, ids, num_sets: int, ways: int, slots_out, hit_out=None,
              last_used=None, uses=None, tick: int = 0, flags: int = 0, heads=None, next_=None,
              epoch: int = 0, headers: int = 0, row_bytes: int = 0, now: int = 0, cleared=None, marks=None,
              repeated=None, spilled=None, skip=None) -> None:
        n = len(ids)
        if n == 0:
            return
        fast = ways == 32 and not flags & ALL_NEW
        name = PROBE_TYPES["ways32" if fast else "generic"]
        per_warp = 4 if fast else 1
        self._fn(name)(self._grid(-(-n // per_warp) * 32), (THREADS,), (
            keys, occupied, ids, np.int64(n), np.int64(num_sets), np.int32(ways), slots_out, _ptr(hit_out),
            _ptr(last_used), _ptr(uses), np.int64(tick), np.int32(flags), _ptr(heads), _ptr(next_),
            np.uint64(epoch), np.uint64(headers), np.int64(row_bytes), np.uint32(now), _ptr(cleared), _ptr(marks),
            _ptr(repeated), _ptr(spilled), _ptr(skip)))

    def choose_victims(self, ids, keys, occupied, locks, last_used, uses, num_sets: int, ways: int,
                       lfu: bool, tick: int, heads, next_, hit, epoch: int, slots_out, dirty=None,
                       mark_dirty: bool = False, victim_keys=None, victim_dirty=None) -> None:
        """Slots for the new ids the probe linked; given victim_keys and victim_dirty, also
        claims them (what each slot held recorded, then its key and stamps set)."""
        n = len(ids)
        if n == 0:
            return
        claim = victim_keys is not None
        self._fn("choose_victims")(self._grid(n), (THREADS,), (
            ids, keys, occupied, locks, last_used, uses, np.int64(num_sets), np.int32(ways), np.int32(lfu),
            np.int64(tick), heads, next_, hit, np.int64(n), np.uint64(epoch), slots_out, np.int32(claim),
            _ptr(dirty), np.bool_(mark_dirty), _ptr(victim_keys), _ptr(victim_dirty)))

    def fill_meta(self, slots, ids, keys, occupied, dirty, dirty_src, dirty_value: bool, last_used, uses,
                  tick: int, num_sets: int, ways: int, spilled) -> None:
        n = len(slots)
        if n == 0:
            return
        self._fn("fill_meta")(self._grid(n), (THREADS,), (
            slots, ids, np.int64(n), keys, occupied, dirty, _ptr(dirty_src), np.bool_(dirty_value),
            last_used, uses, np.int64(tick), np.int64(num_sets), np.int32(ways), spilled))

    def stamp_slots(self, slots, stamps, value: int) -> None:
        self._each("stamp_slots", len(slots), slots, np.int64(len(slots)), stamps, np.int64(value))

    def flag_slots(self, slots, flags, value: bool) -> None:
        self._each("flag_slots", len(slots), slots, np.int64(len(slots)), flags, np.bool_(value))

    def pack_victims(self, slots, occupied, dirty, out, counts) -> None:
        """The dirty, then the clean, rows' slots that `slots` displace into `out`; their counts into `counts`."""
        self._fn("pack_victims")((1,), (1024,), (slots, np.int64(len(slots)), occupied, dirty, out, counts))

    def count_set(self, flags, total) -> None:
        """total[0] += how many of `flags` are set."""
        self._each("count_set", len(flags), flags, np.int64(len(flags)), total)

    def count_locked(self, locks, total) -> None:
        """total[0] += how many of `locks` are above 0."""
        self._each("count_locked", len(locks), locks, np.int64(len(locks)), total)

    def spill_candidates(self, ids, slots, occupied, locks, num_sets: int, ways: int, count) -> None:
        self._each("spill_candidates", len(ids), ids, slots, np.int64(len(ids)), occupied, locks, np.int64(num_sets),
                   np.int32(ways), count)

    def touch_headers(self, headers: int, row_bytes: int, idx, n: int, now: int) -> None:
        """Record an access in the headers at address `headers` + row * `row_bytes` of rows idx[r]."""
        if n == 0:
            return
        self._fn("touch_headers")(self._grid(n), (THREADS,), (
            np.uint64(headers), np.int64(row_bytes), _ptr(idx), np.int64(n), np.uint32(now)))

    def nonfinite_rows(self, rows, n: int, weight_off: int, dim: int, weight_dtype: str, state_off: int,
                       state_dim: int, out) -> None:
        """out[r] = row r of `rows` ([n, row_bytes] bytes) holds NaN or Inf in its weights
        (`weight_dtype`, at `weight_off`) or its float32 state (at `state_off`)."""
        if n == 0:
            return
        size, exponent = EXPONENTS[weight_dtype]
        self._fn("nonfinite_rows")(self._grid(n * 32), (THREADS,), (
            rows, np.int64(rows.strides[0]), np.int64(n), np.int64(weight_off), np.int32(dim), np.int32(size),
            np.uint64(exponent), np.int64(state_off), np.int32(state_dim), out))

    def copy_rows(self, src, src_idx, src_stride: int, src_off: int, dst, dst_idx, dst_stride: int,
                  dst_off: int, nbytes: int, n: int, rotate: int = 0) -> None:
        """Bytes [off, off + nbytes) of row src_idx[r] of src into row dst_idx[r] of dst, r < n.
        A missing index means r; a negative index skips the row. With `rotate`, destination
        byte b takes source byte (b + rotate) mod nbytes. The widest unit (up to 16 bytes)
        that divides every stride, offset, size, rotation and base address is used."""
        if n == 0 or nbytes == 0:
            return
        unit = 16
        for value in (src_stride, src_off, dst_stride, dst_off, nbytes, rotate, src.data.ptr, dst.data.ptr):
            while value % unit:
                unit //= 2
        units = nbytes // unit
        lg = min(5, max(0, (units - 1).bit_length()))
        rows = self.copy_rows_in_flight if unit == 16 else COPY_ROWS_IN_FLIGHT
        self._fn(f"copy_rows<{COPY_TYPES[unit]}, {rows}>")(self._grid(-(-n // rows) << lg), (THREADS,), (
            src, _ptr(src_idx), np.int64(src_stride), np.int64(src_off), dst, _ptr(dst_idx),
            np.int64(dst_stride), np.int64(dst_off), np.int32(units), np.int64(n), np.int32(lg),
            np.int32(rotate // unit)))

    def prepare_step(self, optimizer_name: str, dtype: str) -> None:
        """Compile (or load from CuPy's disk cache) the fused steps a table of this optimizer and
        weight dtype uses, so its first step does not wait for NVRTC."""
        _step_module(self.device_id, WEIGHT_TYPES[dtype], OPTIMIZER_CODES[optimizer_name])

    def optimizer_step(self, optimizer, dtype: str, headers: int, row_bytes: int, weight_off: int, state_off: int,
                       idx, grads, n: int, dim: int, dirty, now: int, touch: bool, segments=None,
                       skip=None) -> None:
        """One fused step of `optimizer` (an OptimizerConfig) on rows idx[r]: the row whose header
        lies at address `headers` + row * `row_bytes`, its weights `weight_off` and its state
        `state_off` bytes from that header (either may be negative). Coefficients are rounded as
        the host optimizers round them. With `segments` (order, starts), row r's gradient is the
        sum of grads[order[j]] over segment r. `skip`: a device int32 that, when set by earlier
        work, makes the launch do nothing."""
        if n == 0:
            return
        c = optimizer
        # four elements a lane, moved as one vector: all weights, state and gradient rows 16-byte aligned
        vec = dim % 4 == 0 and dim <= 128 and all(v % 16 == 0 for v in (
            headers + weight_off, headers + state_off, row_bytes, grads.data.ptr))
        seg = segments is not None
        order, starts = segments if seg else (None, None)
        weight, code = WEIGHT_TYPES[dtype], OPTIMIZER_CODES[c.name]
        bias = _bias_table(self.device_id, c.lr, c.beta1, c.beta2) if c.name in ADAMS else None
        step = _step_function(self.device_id, weight, code, vec, seg)
        step(self._grid(-(-n // STEP_ROWS_IN_FLIGHT) * 32, self.step_blocks), (THREADS,), (
            np.uint64(headers), np.int64(row_bytes), np.int64(weight_off), _ptr(idx), grads, _ptr(order),
            _ptr(starts), np.int64(len(order) if seg else n), np.int64(n), np.int32(dim), np.int64(state_off),
            np.float32(c.lr), np.float32(c.eps), np.float32(c.beta1), np.float32(c.beta2),
            np.float32(1 - c.beta1), np.float32(1 - c.beta2), np.float64(c.lr), np.float64(c.beta1),
            np.float64(c.beta2), _ptr(bias), np.int64(0 if bias is None else len(bias)), np.float32(c.weight_decay),
            _ptr(dirty), np.uint32(now), np.int32(touch), _ptr(skip)))

    def sum_segments(self, grads, order, starts, out) -> None:
        """out[u] = sum of grads[order[j]] for j in segment u (starts[u] up to the next start)."""
        segments, dim = out.shape
        if segments == 0:
            return
        vec = dim % 4 == 0 and dim <= 128 and grads.data.ptr % 16 == 0 and out.data.ptr % 16 == 0
        self._fn("sum_segments")(self._grid(-(-segments // 4) * 32 if vec else segments * 32), (THREADS,), (
            grads, order, starts, np.int64(segments), np.int64(len(order)), np.int32(dim), np.int32(vec), out))

    def _each(self, name: str, n: int, *args) -> None:
        """A grid-stride kernel over n items."""
        if n:
            self._fn(name)(self._grid(n), (THREADS,), args)

    def mix_ids(self, ids, out) -> None:
        self._each("mix_ids", len(ids), ids, np.int64(len(ids)), out)

    def segment_heads(self, mixed, order, heads) -> None:
        self._each("segment_heads", len(order), mixed, order, np.int64(len(order)), heads)

    def segment_index(self, ids, order, heads, ends, starts, uniq, inverse, values=None, uniq_values=None) -> None:
        self._each("segment_index", len(order), ids, order, heads, ends, np.int64(len(order)), starts, uniq,
                   _ptr(inverse), _ptr(values), _ptr(uniq_values))

    def sets_of(self, ids, num_sets: int, out) -> None:
        if len(ids):
            self._fn("sets_of")(self._grid(len(ids)), (THREADS,), (ids, np.int64(len(ids)), np.int64(num_sets), out))


@functools.cache
def kernels_for(device_id: int) -> Kernels:
    return Kernels(device_id)
