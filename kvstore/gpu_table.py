"""A table whose cache tier lives in GPU memory.

Same promises as `Table` (request order, `on_miss`, last write wins, summed
duplicate gradients, write policies, locks); the batch paths run on the device:
probe and touch, gathers of weights and state, and one fused optimizer kernel
per step. Misses travel to and from RocksDB through a pinned host buffer.

Callers on the GPU pass torch CUDA tensors or CuPy arrays and get results of
the same kind back without copies (DLPack); NumPy callers get NumPy arrays.
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator

import cupy
import numpy as np

from .errors import FailedPrecondition, InvalidArgument, RowNotFound
from .eviction.tracker import check_scores
from .gpu_arrays import BF16, PinnedBuffer, device_dtype, from_device, kind_of, to_device
from .gpu_cache import GpuCache
from .rows import encode_scores
from .table import ON_MISS, LookupResult, Table


def device_index(device: str) -> int:
    """'cuda' or 'cuda:N' -> N."""
    if device == "cuda":
        return 0
    prefix, _, index = device.partition(":")
    if prefix != "cuda" or not index.isdigit():
        raise InvalidArgument(f"cache.device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return int(index)


def sum_duplicates(cache: GpuCache, ids: cupy.ndarray, grads: cupy.ndarray
                   ) -> tuple[cupy.ndarray, cupy.ndarray, cupy.ndarray]:
    """Unique ids, the float32 sum of each one's gradient rows, and each id's position among
    them, on the device. Unique ids come in the order of their mix, which is the cache's set
    order: the optimizer step then walks the slab forward instead of jumping around it."""
    mixed, inverse = cupy.unique(cache.mix(ids), return_inverse=True)
    uniq, inverse = cache.unmix(mixed), inverse.reshape(-1)
    if len(uniq) == len(ids):
        out = cupy.empty_like(grads)
        out[inverse] = grads
        return uniq, out, inverse
    out = cupy.zeros((len(uniq), grads.shape[1]), dtype=cupy.float32)
    cupy.add.at(out, inverse, grads)
    return uniq, out, inverse


def last_occurrences(ids: cupy.ndarray) -> cupy.ndarray:
    """Position of the last occurrence of each distinct id, in increasing id order."""
    order = cupy.lexsort(cupy.stack([cupy.arange(len(ids)), ids]))
    ordered = ids[order]
    last = cupy.ones(len(ids), dtype=cupy.bool_)
    last[:-1] = ordered[1:] != ordered[:-1]
    return order[last]


class GpuTable(Table):
    profile = False          # when True, `phases` accumulates seconds per stage (with syncs)

    def __init__(self, config, rocks, writer, clock=time.time, family=None):
        super().__init__(config, rocks, writer, clock, family)
        self.device = self.cache.device
        self.kernels = self.cache.kernels
        self.pinned = PinnedBuffer()
        self.phases: Counter[str] = Counter()
        self._weight_bytes = config.dim * self.layout.dtype.itemsize

    def _make_cache(self) -> GpuCache:
        index = device_index(self.config.cache.device)
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError:
            count = 0
        if index >= count:
            raise FailedPrecondition(f"cache.device: {self.config.cache.device!r} is not available "
                                     f"({count} CUDA devices)")
        return GpuCache(self.config.cache, self.layout.row_bytes, index)

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        if not self.profile:
            yield
            return
        cupy.cuda.get_current_stream().synchronize()
        start = time.perf_counter()
        yield
        cupy.cuda.get_current_stream().synchronize()
        self.phases[name] += time.perf_counter() - start

    # --- arguments -------------------------------------------------------------

    def _ids(self, ids) -> np.ndarray:
        """Host ids (for the paths that run on the host), from any kind of array."""
        array, on_device = to_device(ids, self.device)
        return super()._ids(cupy.asnumpy(array) if on_device else array)

    def _device_ids(self, ids) -> cupy.ndarray:
        array, on_device = to_device(ids, self.device)
        if not on_device:
            return cupy.asarray(super()._ids(array))
        if array.ndim != 1:
            raise InvalidArgument(f"ids: must be one-dimensional, got shape {array.shape}")
        if array.size and array.dtype.kind not in "iu":
            raise InvalidArgument(f"ids: must be integers, got {array.dtype}")
        if array.dtype == cupy.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max:
            raise InvalidArgument("ids: values must fit in int64")
        return cupy.ascontiguousarray(array, dtype=cupy.int64)

    def _device_matrix(self, values, n: int, width: int, dtype: np.dtype, field: str) -> cupy.ndarray:
        array, on_device = to_device(values, self.device)
        if not on_device:
            return self.pinned.upload(self._matrix(array, n, width, dtype, field))
        if array.shape != (n, width):
            raise InvalidArgument(f"{field}: expected shape ({n}, {width}) for {n} ids, got {array.shape}")
        if array.dtype.kind not in "fiu":
            raise InvalidArgument(f"{field}: must be floating point, got {array.dtype}")
        if dtype == BF16 and array.dtype != cupy.uint16:   # round float values to bfloat16 bits (nearest even)
            bits = array.astype(cupy.float32).view(cupy.uint32)
            array = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cupy.uint16)
        array = cupy.ascontiguousarray(array, dtype=device_dtype(dtype))
        if not self.config.allow_nonfinite:
            bad = ((array & 0x7F80) == 0x7F80).any() if dtype == BF16 else ~cupy.isfinite(array).all()
            if bool(bad):
                raise InvalidArgument(f"{field}: contains NaN or Inf (table {self.name!r} does not allow them)")
        return array

    # --- reads -------------------------------------------------------------------

    def lookup(self, ids, on_miss: str = "init_insert", with_state: bool = False) -> LookupResult:
        """Rows in request order, duplicates included; misses follow `on_miss`."""
        if on_miss not in ON_MISS:
            raise InvalidArgument(f"on_miss: unknown mode {on_miss!r}; expected one of {list(ON_MISS)}")
        kind = kind_of(ids)
        with self.device:
            ids = self._device_ids(ids)
            n = len(ids)
            weights = cupy.empty((n, self.config.dim), dtype=device_dtype(self.layout.dtype))
            state = cupy.empty((n, self.config.state_dim), dtype=cupy.float32) if with_state else None
            with self._lock:
                self.cache.begin_batch()
                with self._phase("probe_and_gather"):
                    slots = self.cache.probe_and_touch(ids, now=int(self.clock()))   # an access, in the header
                    self._gather(self.cache.slab, slots, weights, state)
                    hit = slots >= 0
                    hits = int(cupy.count_nonzero(hit))
                self.counters["cache_hits"] += hits
                if hits < n:
                    self.counters["cache_misses"] += n - hits
                    with self._phase("misses_to_host"):     # few ids: unique on the host
                        where = cupy.nonzero(~hit)[0]
                        miss_ids, inverse = np.unique(cupy.asnumpy(ids[where]), return_inverse=True)
                    loaded = self._load(miss_ids, on_miss)
                    with self._phase("upload"):
                        rows = self.pinned.upload(loaded)
                    with self._phase("gather_misses"):
                        source = cupy.full(n, -1, dtype=cupy.int64)
                        source[where] = cupy.asarray(inverse.reshape(-1))
                        self._gather(rows, source, weights, state)
        state = None if state is None else from_device(state, kind, np.dtype(np.float32))
        return LookupResult(from_device(weights, kind, self.layout.dtype), state)

    def lookup_if_cached(self, ids, with_state: bool = False) -> LookupResult | None:
        """None: a device lookup waits for the device, so it always runs where waiting is allowed."""
        return None

    def _gather(self, rows: cupy.ndarray, index: cupy.ndarray, weights: cupy.ndarray, state) -> None:
        """Weights (and state) of rows[index[i]] into row i of the outputs; index -1 skips."""
        self.kernels.copy_rows(rows, index, self.layout.row_bytes, self.layout.weight_offset, weights, None,
                               self._weight_bytes, 0, self._weight_bytes, len(index))
        if state is not None:
            nbytes = self.config.state_dim * 4
            self.kernels.copy_rows(rows, index, self.layout.row_bytes, self.layout.state_offset, state, None,
                                   nbytes, 0, nbytes, len(index))

    def _fetch(self, ids: np.ndarray, initialize: bool):
        with self._phase("rocksdb_fetch"):
            return super()._fetch(ids, initialize)

    def _load(self, ids: np.ndarray, on_miss: str) -> np.ndarray:
        """Rows of unique uncached ids from RocksDB or the initializer; caches what is stored
        and records the access in the cached copies' headers. (GPU tables have no admission
        filter and no store eviction: their configs refuse both.)"""
        rows, present = self._fetch(ids, initialize=on_miss not in ("zeros", "error"))
        absent = ~present
        if on_miss == "error" and absent.any():
            missing = ids[absent]
            raise RowNotFound(f"ids: {len(missing)} ids not found in table {self.name!r} (first: {missing[0]})")
        if on_miss != "zeros":
            self.counters["rows_initialized"] += int(absent.sum())
        new = absent if on_miss == "init_insert" else np.zeros_like(absent)
        self.eviction.created(int(new.sum()))
        stored = present | new
        slots = self._admit(ids[stored], rows[stored], new[stored])
        cached = cupy.asarray(slots[slots >= 0])
        self.kernels.touch_headers(self.cache.slab, self.layout.row_bytes, cached, len(cached), int(self.clock()))
        return rows

    def _admit(self, ids, rows, new) -> np.ndarray:
        """Put rows (host or device) into the cache; returns the slot of each (-1: not cached).
        Dirty victims and rows that must persist now (write-through, or no usable way) go
        to RocksDB first."""
        if len(ids) == 0:
            return np.zeros(0, dtype=np.int64)
        with self.device, self._phase("admit"):
            ids_d = cupy.asarray(ids)
            choice = self.cache.choose_slots(ids_d)
            slots = cupy.asnumpy(choice.slots)
            cached = slots >= 0
            new = np.asarray(new, dtype=bool)
            persist_now = new & (~cached | self.write_through)
            host_ids = cupy.asnumpy(ids)
            if len(choice.dirty_ids) or persist_now.any():
                host_rows = self.pinned.download(rows) if isinstance(rows, cupy.ndarray) else rows
                self._write_back(cupy.asnumpy(choice.dirty_ids), self.pinned.download(choice.dirty_rows),
                                 host_ids[persist_now], host_rows[persist_now])
            rows_d = rows if isinstance(rows, cupy.ndarray) else self.pinned.upload(rows)
            self.cache.fill(choice.slots, ids_d, rows_d, cupy.asarray(new & (not self.write_through)))
            return slots

    # --- writes --------------------------------------------------------------------

    def _current_rows(self, ids: cupy.ndarray, initialize: bool, slots=None):
        """[n, row_bytes] device rows of unique ids (cache, else RocksDB, else new), their
        slots, and how many ids have no row yet."""
        if slots is None:
            slots = self.cache.probe_and_touch(ids)
        rows = self.cache.gather_rows(slots)
        where = cupy.nonzero(slots < 0)[0]
        created = 0
        if len(where):
            fetched, present = self._fetch(cupy.asnumpy(ids[where]), initialize)
            created = int((~present).sum())
            fetched = self.pinned.upload(fetched)
            self.kernels.copy_rows(fetched, None, self.layout.row_bytes, 0, rows, where, self.layout.row_bytes,
                                   0, self.layout.row_bytes, len(where))
        return rows, slots, created

    def _write_scores(self, rows: cupy.ndarray, index, scores: np.ndarray) -> None:
        """Feature scores (bfloat16 bits) into the headers of rows[index[i]] (index None: row i)."""
        bits = cupy.asarray(encode_scores(scores))
        self.kernels.copy_rows(bits, None, 2, 0, rows, index, self.layout.row_bytes, 2, 2, len(bits))

    def _host_scores(self, scores, n: int) -> np.ndarray | None:
        if scores is None:
            return None
        array, on_device = to_device(scores, self.device)
        return check_scores(cupy.asnumpy(array) if on_device else array, n)

    def _store_rows(self, ids: cupy.ndarray, rows: cupy.ndarray, slots: cupy.ndarray) -> None:
        """Make `rows` the value of unique `ids` in every tier, as the write policy says."""
        self.kernels.touch_headers(rows, self.layout.row_bytes, None, len(rows), int(self.clock()))
        if self.write_through:
            self._write_back(cupy.asnumpy(ids), self.pinned.download(rows))
        self.cache.scatter_rows(slots, rows)
        hit = slots >= 0
        if not self.write_through:
            self.cache.dirty[slots[hit]] = True
        where = cupy.nonzero(~hit)[0]
        self._admit(ids[where], rows[where], np.full(len(where), not self.write_through))

    def update(self, ids, weights, state=None, scores=None) -> int:
        """Overwrite weights (and optimizer state, and feature scores, when given); last write
        wins within the batch."""
        with self.device:
            ids = self._device_ids(ids)
            n = len(ids)
            weights = self._device_matrix(weights, n, self.config.dim, self.layout.dtype, "weights")
            if state is not None:
                state = self._device_matrix(state, n, self.config.state_dim, np.dtype(np.float32), "state")
            scores = self._host_scores(scores, n)
            last = last_occurrences(ids)
            scores = None if scores is None else scores[cupy.asnumpy(last)]
            ids, weights = ids[last], cupy.ascontiguousarray(weights[last])
            state = None if state is None else cupy.ascontiguousarray(state[last])
            with self._lock:
                self._check_writable()
                self.cache.begin_batch()
                rows, slots, created = self._current_rows(ids, initialize=False)
                size = self.layout.row_bytes
                self.kernels.copy_rows(weights, None, self._weight_bytes, 0, rows, None, size,
                                       self.layout.weight_offset, self._weight_bytes, len(ids))
                if state is not None:
                    nbytes = self.config.state_dim * 4
                    self.kernels.copy_rows(state, None, nbytes, 0, rows, None, size, self.layout.state_offset,
                                           nbytes, len(ids))
                if scores is not None:
                    self._write_scores(rows, None, scores)
                self._store_rows(ids, rows, slots)
                self.eviction.created(created)
                self.changes.record(self.name, cupy.asnumpy(ids))
                self.counters["rows_updated"] += len(ids)
            return len(ids)

    def apply_gradients(self, ids, grads, owner: str | None = None, scores=None) -> int:
        """Sum duplicate ids' gradients, then one fused optimizer step per unique row; `scores`
        (the highest wins for duplicates) become the rows' feature scores. Rows all cached
        (write-back): stepped in place in the slab, nothing moves."""
        with self.device:
            ids = self._device_ids(ids)
            grads = self._device_matrix(grads, len(ids), self.config.dim, np.dtype(np.float32), "grads")
            scores = self._host_scores(scores, len(ids))
            ids, grads, inverse = sum_duplicates(self.cache, ids, grads)
            if scores is not None:                       # the highest score of each unique id
                best = np.full(len(ids), -np.inf, dtype=np.float32)
                np.maximum.at(best, cupy.asnumpy(inverse), scores)
                scores = best
            with self._lock:
                self._check_writable()
                self.cache.begin_batch()
                slots = self.cache.probe_and_touch(ids)
                if not self.write_through and bool((slots >= 0).all()):
                    if scores is not None:
                        self._write_scores(self.cache.slab, slots, scores)
                    self.cache.optimizer_step(slots, grads, self.config.optimizer, self.layout,
                                              now=int(self.clock()))
                else:
                    rows, slots, created = self._current_rows(ids, initialize=True, slots=slots)
                    if scores is not None:
                        self._write_scores(rows, None, scores)
                    self.cache.optimizer_step(None, grads, self.config.optimizer, self.layout, rows=rows)
                    self._store_rows(ids, rows, slots)
                    self.counters["rows_initialized"] += created
                    self.eviction.created(created)
                self.changes.record(self.name, cupy.asnumpy(ids))
                if owner is not None:
                    self._release(cupy.asnumpy(ids), owner)
                self.counters["rows_stepped"] += len(ids)
            return len(ids)

    # --- prefetch, locks, maintenance ----------------------------------------------

    def prefetch(self, ids, lock: bool = False, owner: str = "") -> int:
        ids = np.unique(self._ids(ids))
        with self._lock, self.device:
            self.cache.begin_batch()
            slots = cupy.asnumpy(self.cache.probe(ids))
            if (slots < 0).any():
                self._load(ids[slots < 0], "init_insert")
                slots = cupy.asnumpy(self.cache.probe(ids))
            cached = slots >= 0
            slots_d = cupy.asarray(slots[cached])
            self.cache.touch(slots_d)
            if lock:                                     # an owner pins a row at most once
                held = self._leases.get(owner)
                fresh = cached if held is None else cached & ~np.isin(ids, held, assume_unique=True)
                self.cache.locks[cupy.asarray(slots[fresh])] += 1
                self._leases[owner] = ids[fresh] if held is None else np.union1d(held, ids[fresh])
            return int(cached.sum())

    def _release(self, ids: np.ndarray, owner: str) -> int:
        with self.device:
            return super()._release(ids, owner)

    def _existing(self, ids: np.ndarray) -> np.ndarray:
        """Which unique ids have a row (cached or stored). Call under the lock."""
        exists = cupy.asnumpy(self.cache.probe(ids)) >= 0
        if (~exists).any():
            exists[~exists] = self._stored_rows(ids[~exists])[1]
        return exists

    def read_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, exists) of unique `ids` as they are now, without counting an access: the dirty
        cached rows reach RocksDB first, which then has every row."""
        with self._lock:
            self._settle()
            return self._stored_rows(ids)

    def flush(self, slice_rows: int = 0) -> int:
        """Hand every dirty cached row to the store's writer in one go and wait until RocksDB
        has them; returns rows written."""
        with self._flush_lock:
            started = time.monotonic()
            with self._lock:
                job, written = self._hand_over_dirty()
            if job is not None:
                job.wait()
            self._save_row_count()
            self.last_flush = started
            return written

    def _hand_over_dirty(self):
        with self.device:
            slots = self.cache.dirty_slots()
            if not len(slots):
                return None, 0
            rows = self.pinned.download(self.cache.gather_rows(slots)).copy()   # the writer keeps them
            job = self._write_behind(cupy.asnumpy(self.cache.keys[slots]), rows, "flush")
            self.cache.dirty[slots] = False
            return job, len(slots)

    def _settle(self) -> None:
        self._hand_over_dirty()
        self.pending.wait_for_all()
