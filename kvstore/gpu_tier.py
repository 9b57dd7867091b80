"""The cache tier in GPU memory: `tiers.HostTier`'s interface over a `GpuCache` in HBM.

Ids, slots and rows cross the boundary as host arrays, through page-locked
buffers from CuPy's pinned pool that belong to the call that asked (two calls
never share one). Inside, everything runs on the device: probes and victim
choice, gathers of the requested columns, and the fused optimizer kernels,
which step a call's staged rows where they are. Row headers live in the slab
as on the host, so TTL, capacity, norm, frequency and admission rules see the
same access counts and times on either tier.
"""
from __future__ import annotations

import cupy
import cupyx
import numpy as np

from .arrays import BF16
from .cache import Eviction
from .config import CacheConfig, OptimizerConfig
from .errors import FailedPrecondition, ResourceExhausted
from .gpu_cache import GpuCache, download, download_all, dtype_name
from .rows import HEADER, HEADER_BYTES, RowLayout, slab_pitch


def device_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype an array of `dtype` has on the device (bfloat16, which CuPy lacks -> uint16 bits)."""
    return np.dtype(np.uint16) if dtype == BF16 else np.dtype(dtype)


def upload(host: np.ndarray) -> cupy.ndarray:
    """A device copy of a host array, staged through a page-locked buffer of its own."""
    host = np.ascontiguousarray(host)
    if host.dtype == BF16:
        host = host.view(np.uint16)
    staged = cupyx.empty_pinned(host.shape, dtype=host.dtype)
    np.copyto(staged, host)
    out = cupy.empty(host.shape, dtype=host.dtype)
    if host.size:
        out.set(staged)
    return out


GPU_SLOT_METADATA = 31       # bytes per slot beside its row: key, stamps, lock count, flags, set lists
COPY_PIECE_ROWS = 16384     # rows per piece of a lookup's gather + copy-out pipeline
RECENT_ARRAYS = 4           # index arrays passed to or from the table whose device copies are kept


class GpuTier:
    gathers_to_device = True       # cached_columns' `out` may be a CuPy array (see _gather_to_device)

    def __init__(self, config: CacheConfig, layout: RowLayout, optimizer: OptimizerConfig, device: int):
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError:
            count = 0
        if device >= count:
            raise FailedPrecondition(f"cache.device: 'cuda:{device}' is not available ({count} CUDA devices)")
        with cupy.cuda.Device(device):
            free, total = cupy.cuda.runtime.memGetInfo()
        pitch = slab_pitch(layout.row_bytes)
        need = config.rows * (pitch + GPU_SLOT_METADATA)
        if need > free:
            raise ResourceExhausted(f"cache.rows: {config.rows} slots of {layout.row_bytes}-byte rows ({pitch} bytes "
                                    f"apart in device memory) need {need} bytes of GPU memory; cuda:{device} has "
                                    f"{free} free of {total}")
        self.cache = GpuCache(config, layout.row_bytes, device)
        self.device = self.cache.device
        self.kernels = self.cache.kernels
        self.kernels.prepare_step(optimizer.name, dtype_name(layout.dtype))     # at create, not the first step
        self.layout = layout
        self.optimizer = optimizer
        self.capacity = self.cache.capacity
        self.row_bytes = layout.row_bytes
        self._weight_bytes = layout.dim * layout.dtype.itemsize
        self._state_bytes = layout.state_dim * 4
        with self.device:
            self._copy_stream = cupy.cuda.Stream(non_blocking=True)   # copies out, beside the gathers
        self._recent: list[tuple[np.ndarray, np.ndarray, cupy.ndarray]] = []

    def _d(self, index: np.ndarray) -> cupy.ndarray:
        """`index` on the device: the device copy of an array this tier just returned or was just
        given (a table passes a probe's slots, or a batch's new ids, back two to four times in
        one call) when it still holds what it held then, else uploaded."""
        for host, held, device in self._recent:
            if host is index and np.array_equal(host, held):
                return device
        return cupy.asarray(np.ascontiguousarray(index, dtype=np.int64))

    def _remember(self, host: np.ndarray, device: cupy.ndarray) -> np.ndarray:
        """Keep `device`, a copy of `host`, for `_d` (with a host copy to check that `host` is
        unchanged when it comes back: checking is far cheaper than an upload)."""
        self._recent = [(host, host.copy(), device), *self._recent[:RECENT_ARRAYS - 1]]
        return host

    # --- reads ----------------------------------------------------------------------

    def begin_batch(self) -> None:
        self.cache.begin_batch()

    def probe(self, ids: np.ndarray) -> np.ndarray:
        with self.device:
            slots = self.cache.probe(self._d(ids))
            return self._remember(cupy.asnumpy(slots), slots)

    def probe_and_touch(self, ids: np.ndarray, now: float) -> np.ndarray:
        """Probe and, for hits, stamps and header access in one kernel (duplicates count once)."""
        with self.device:
            return cupy.asnumpy(self.cache.probe_and_touch(self._d(ids), now=int(now)))

    def touch(self, slots: np.ndarray) -> None:
        with self.device:
            self.cache.touch(self._d(slots))

    def access(self, slots: np.ndarray, now: float) -> None:
        """Stamps and header access of cached slots (duplicates count once: made unique here, on
        the host, where a few thousand slots take microseconds and no wait for the device)."""
        with self.device:
            slots_d = self._d(np.unique(slots))
            self.cache.touch(slots_d)
            self.cache.touch_headers(slots_d, int(now))

    def cached_columns(self, ids: np.ndarray, now: float, with_state: bool, out: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """`HostTier.cached_columns` on the device, with one wait: a pure probe that flags any id
        not cached, the touch of a new batch that the device skips when that flag is set, and
        the gather and copy out, all queued before the wait. None, with nothing changed, when
        any id is not cached or the device still has queued work (a caller that must not block,
        such as a server's event loop, then waits only for this call's own few kernels and
        copies). A host `out` receives the weights from the page-locked buffer they come down in."""
        with self.device:
            if not cupy.cuda.get_current_stream().done:
                return None
            ids_d = upload(ids)
            flags = cupy.zeros(2, dtype=cupy.int32)          # [1]: an id is not cached
            slots_d = self.cache.probe(ids_d, missed=flags)
            self.cache.begin_batch()
            self.cache.probe_and_touch(ids_d, now=int(now), skip=flags[1:])
            missed = cupyx.empty_pinned(2, dtype=np.int32)
            flags.get(out=missed, blocking=False)
            if isinstance(out, cupy.ndarray):                  # a client's buffer: written only on success
                cupy.cuda.get_current_stream().synchronize()
                if missed[1]:
                    return self._not_begun()
                return self._gather_to_device(slots_d, out), (self._columns(slots_d, True)[1] if with_state
                                                              else None)
            weights, state = self._columns(slots_d, with_state)   # waits for the copy stream, after `flags`
            if missed[1]:
                return self._not_begun()
            if out is None:
                return weights, state
            out[...] = weights
            return out, state

    def _not_begun(self) -> None:
        """The batch cached_columns began touched nothing (the device skipped it): take it back."""
        self.cache.tick -= 1
        return None

    def _gather_to_device(self, slots_d: cupy.ndarray, out: cupy.ndarray) -> cupy.ndarray:
        """Weights of `slots_d` gathered into `out` (a device array, such as a client's GPU buffer
        opened by CUDA IPC), finished before this returns."""
        if out.device.id == self.device.id:
            self.cache.gather(slots_d, self.layout.weight_offset, self._weight_bytes, out)
        else:
            rows = self.cache.gather(slots_d, self.layout.weight_offset, self._weight_bytes,
                                     cupy.empty(out.shape, out.dtype))
            cupy.cuda.runtime.memcpyPeer(out.data.ptr, out.device.id, rows.data.ptr, self.device.id, rows.nbytes)
        cupy.cuda.get_current_stream().synchronize()
        return out

    def probe_touch_columns(self, ids: np.ndarray, now: float, with_state: bool, out: np.ndarray | None = None
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Probe and touch, then gather the slots found, on the device: ids go up once, slots and
        rows come down together (one synchronization instead of two). With `out`, the weights
        are copied there from the page-locked buffer they come down into."""
        with self.device:
            slots_d = self.cache.probe_and_touch(self._d(ids), now=int(now))
            slots = cupyx.empty_pinned(len(slots_d), slots_d.dtype)
            copy = self._copy_stream
            copy.wait_event(cupy.cuda.get_current_stream().record())
            slots_d.get(stream=copy, out=slots, blocking=False)
            weights, state = self._columns(slots_d, with_state)     # ends with the copy stream's sync
            if out is not None:
                out[...] = weights
                weights = out
            return slots, weights, state

    def columns(self, slots: np.ndarray, with_state: bool) -> tuple[np.ndarray, np.ndarray | None]:
        with self.device:
            return self._columns(self._d(slots), with_state)

    def _columns(self, slots_d: cupy.ndarray, with_state: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Weights (and state) of `slots_d` gathered on the device and copied out into page-locked
        buffers of this call; rows of slot -1 hold garbage. Large batches go in pieces, each
        piece's copy out on a second stream overlapping the gather of the next."""
        with self.device:
            n = len(slots_d)
            parts = [(self.layout.weight_offset, self._weight_bytes, self.layout.dim,
                      device_dtype(self.layout.dtype))]
            if with_state:
                parts.append((self.layout.state_offset, self._state_bytes, self.layout.state_dim,
                              np.dtype(np.float32)))
            device = [cupy.empty((n, width), dtype=dtype) for _, _, width, dtype in parts]
            host = [cupyx.empty_pinned((n, width), dtype=dtype) for _, _, width, dtype in parts]
            compute, copy = cupy.cuda.get_current_stream(), self._copy_stream
            for at in range(0, n, COPY_PIECE_ROWS):
                end = min(n, at + COPY_PIECE_ROWS)
                for (offset, nbytes, _, _), dev in zip(parts, device, strict=True):
                    self.cache.gather(slots_d[at:end], offset, nbytes, dev[at:end])
                copy.wait_event(compute.record())
                for dev, out in zip(device, host, strict=True):
                    dev[at:end].get(stream=copy, out=out[at:end], blocking=False)
            copy.synchronize()
            weights = host[0].view(BF16) if self.layout.dtype == BF16 else host[0]
            return weights, (host[1] if with_state else None)

    def rows(self, slots: np.ndarray) -> np.ndarray:
        with self.device:
            return download(self.cache.gather_rows(self._d(slots)))

    def keys_of(self, slots: np.ndarray) -> np.ndarray:
        with self.device:
            return cupy.asnumpy(self.cache.keys_of(self._d(slots)))

    def flags(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.device:
            occupied, dirty = self.cache.flags(self._d(slots))
            return cupy.asnumpy(occupied), cupy.asnumpy(dirty)

    def headers(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(last_access, count) of the rows in `slots`: only the 16 header bytes cross."""
        with self.device:
            slots_d = self._d(slots)
            out = self.cache.gather(slots_d, 0, HEADER_BYTES, cupy.empty((len(slots_d), HEADER_BYTES), cupy.uint8))
            header = download(out).view(HEADER)[:, 0]
            return header["last_access"].copy(), header["count"].copy()

    # The scans of every slot below run on the host over the flags brought down (a byte a slot):
    # CuPy's compaction compiles reductions per array length, so on a device they compiled for each
    # new cache size under the table lock, in the first flush (seconds of NVRTC on a fresh server).

    def dirty_slots(self) -> np.ndarray:
        with self.device:
            return np.flatnonzero(download(self.cache.dirty))

    def clean_slots(self) -> np.ndarray:
        with self.device:
            occupied, dirty = download_all([self.cache.occupied, self.cache.dirty])
            return np.flatnonzero(occupied & ~dirty)

    def cached_ids(self) -> np.ndarray:
        with self.device:
            return self.keys_of(np.flatnonzero(download(self.cache.occupied)))

    def occupancy(self) -> int:
        with self.device:
            return self.cache.occupancy()

    def locked_rows(self) -> int:
        with self.device:
            return self.cache.locked_rows()

    def dirty_rows(self) -> int:
        with self.device:
            return self.cache.dirty_rows()

    # --- placement and changes of cached rows -------------------------------------------------

    def choose_slots(self, ids: np.ndarray, clean: bool = False) -> Eviction:
        with self.device:
            ids_d = self._d(ids)
            if isinstance(ids, np.ndarray):
                self._remember(ids, ids_d)                  # `fill` gets them next
            choice = self.cache.choose_slots(ids_d, clean)
            parts = [choice.slots, choice.dirty_ids, choice.dirty_rows]
            if clean:
                parts += [choice.clean_ids, choice.clean_rows]
            host = download_all(parts)
            out = Eviction(self._remember(host[0], choice.slots), *host[1:3])
            if clean:
                out.clean_ids, out.clean_rows = host[3:]
            return out

    def fill(self, slots: np.ndarray, ids: np.ndarray, rows: np.ndarray, dirty) -> None:
        with self.device:
            dirty = np.asarray(dirty, dtype=bool) if getattr(dirty, "ndim", 0) else bool(dirty)
            self.cache.fill(self._d(slots), self._d(ids), upload(rows), dirty)

    def write_rows(self, slots: np.ndarray, rows: np.ndarray) -> None:
        with self.device:
            self.cache.scatter_rows(self._d(slots), upload(rows))

    def set_dirty(self, slots: np.ndarray, value: bool) -> None:
        with self.device:
            self.cache.set_dirty(self._d(slots), value)

    def lock(self, slots: np.ndarray) -> None:
        with self.device:
            self.cache.lock(self._d(slots))

    def unlock(self, slots: np.ndarray) -> None:
        with self.device:
            self.cache.unlock(self._d(slots))

    def invalidate(self, ids: np.ndarray) -> None:
        with self.device:
            self.cache.invalidate(self._d(ids))

    def clear(self) -> None:
        with self.device:
            self.cache.clear()

    # --- staged rows (device arrays) ------------------------------------------------------

    def stage(self, slots: np.ndarray) -> cupy.ndarray:
        """Device copies of the rows in `slots`; rows of slot -1 are unset (set them with `load`)."""
        with self.device:
            return self.cache.gather_rows(self._d(slots))

    def load(self, staged: cupy.ndarray, index: np.ndarray, rows: np.ndarray) -> None:
        with self.device:
            staged[self._d(index)] = upload(rows)

    def from_host(self, rows: np.ndarray) -> cupy.ndarray:
        with self.device:
            return upload(rows)

    def select(self, staged: cupy.ndarray, index) -> cupy.ndarray:
        if isinstance(index, slice):
            return staged[index]
        with self.device:
            return staged[self._d(index)]

    def to_host(self, staged: cupy.ndarray) -> np.ndarray:
        with self.device:
            return download(staged)

    def _put_columns(self, staged: cupy.ndarray, values: cupy.ndarray, offset: int, nbytes: int) -> None:
        self.kernels.copy_rows(values, None, nbytes, 0, staged, None, self.row_bytes, offset, nbytes, len(values))

    def set_columns(self, staged: cupy.ndarray, weights: np.ndarray, state: np.ndarray | None) -> None:
        with self.device:
            self._put_columns(staged, upload(weights), self.layout.weight_offset, self._weight_bytes)
            if state is not None:
                self._put_columns(staged, upload(state), self.layout.state_offset, self._state_bytes)

    def set_scores(self, staged: cupy.ndarray, bits: np.ndarray) -> None:
        with self.device:
            self._put_columns(staged, upload(bits.astype(np.uint16)), 2, 2)

    def touch_staged(self, staged: cupy.ndarray, now: float) -> None:
        with self.device:
            self.kernels.touch_headers(staged.data.ptr, self.row_bytes, None, len(staged), int(now))

    def step(self, staged: cupy.ndarray, grads: np.ndarray) -> np.ndarray:
        """The fused optimizer kernel on staged rows; returns which rows now hold NaN or Inf."""
        with self.device:
            self.cache.optimizer_step(None, upload(grads), self.optimizer, self.layout, rows=staged)
            return cupy.asnumpy(self._nonfinite(staged))

    def step_cached(self, ids: np.ndarray, grads: np.ndarray, now: float, refuse_nonfinite: bool
                    ) -> np.ndarray | None:
        """`HostTier.step_cached` with one wait for the device: ids and gradients go up, then a
        pure probe that flags any id not cached, the rows staged, stepped (the header's access
        folded into the step) and checked, and the flag and the check come down together. Only
        then, when every id was cached and the step is kept, are the batch begun, the slots
        stamped, the rows published and marked dirty (queued, no wait). A batch with an id not
        cached costs its caller the staged step it discards."""
        with self.device:
            ids_d = upload(ids)
            grads_d = upload(grads)
            flags = cupy.zeros(2, dtype=cupy.int32)           # [1]: an id is not cached
            slots_d = self.cache.probe(ids_d, missed=flags)
            staged = self.cache.gather_rows(slots_d)
            self.cache.optimizer_step(None, grads_d, self.optimizer, self.layout, now=int(now), rows=staged)
            missed, bad = download_all([flags, self._nonfinite(staged)])
            if missed[1]:
                return None
            if refuse_nonfinite and bad.any():
                return bad
            self.cache.begin_batch()
            self.cache.touch(slots_d)
            self.cache.scatter_rows(slots_d, staged)
            self.cache.set_dirty(slots_d, True)
            return bad

    def _nonfinite(self, staged: cupy.ndarray) -> cupy.ndarray:
        """Which staged rows hold NaN or Inf, by one kernel compiled with the cache's."""
        layout = self.layout
        bad = cupy.empty(len(staged), dtype=cupy.bool_)
        self.kernels.nonfinite_rows(staged, len(staged), layout.weight_offset, layout.dim, dtype_name(layout.dtype),
                                    layout.state_offset, layout.state_dim, bad)
        return bad

    def publish(self, slots: np.ndarray, staged: cupy.ndarray) -> None:
        with self.device:
            self.cache.scatter_rows(self._d(slots), staged)
