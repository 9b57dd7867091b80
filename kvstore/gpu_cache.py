"""The cache tier in GPU memory: the host cache's design, with CUDA kernels on the hot paths.

`GpuCache` is a `SetAssociativeCache` over CuPy arrays in HBM. It gives the same
hits, misses, victims and rows as the host cache for the same config and the
same batches: the probe returns the lowest matching way, and new ids of one
set are ranked in batch order and take that set's ways in (policy key, way)
order, skipping locked slots and slots the batch used, so no slot goes to two
ids. Kernels cover probe (+touch), victim choice, slot claims, row copies
(gather/scatter/write-back extraction) and one fused step per optimizer.

Arguments may be NumPy or CuPy arrays; results are CuPy arrays on the cache's
device. Ways are limited to 32: one warp covers one set.

Rows are kept in the slab rotated: the stored row (rows.py: 16-byte header | weights | state)
with its header moved to the end, so weights | state | header, each row's start `pitch` bytes
after the one before. The weights then start where the row starts: a 512-byte weight vector
is 16 whole 32-byte sectors instead of 17 (16 bytes into a sector after the header), while a
whole row still spans as few sectors as the stored layout (what a fused step reads and
writes). The pitch is the row rounded up to ROW_ALIGN bytes where that pads it by at most
1/16 (else 32, else 16: `slab_pitch`). `gather` and `scatter` take offsets into the stored
row and move bytes to and from the stored layout; `slab` is the [capacity, row_bytes] view of
the rotated rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import cupy
import cupyx
import numpy as np

from .cache import Eviction, SetAssociativeCache
from .config import CacheConfig, OptimizerConfig
from .errors import InvalidArgument
from .gpu_kernels import ALL_NEW, COUNT_USES, HEADERS, LINK, MARK, TOUCH, kernels_for
from .host_kernels import spill_into
from .rows import HEADER_BYTES, RowLayout, slab_pitch


@dataclass
class Claim:
    """What `find_or_insert` did to a batch of unique ids."""

    slots: cupy.ndarray          # [n] slot per id; -1 where a new id's set had no usable way
    hit: cupy.ndarray            # [n] bool: the id was cached before the call
    victim_keys: cupy.ndarray    # [n] per new id: the key its slot held before (where victim_dirty)
    victim_dirty: cupy.ndarray   # [n] bool: its slot held a dirty row, which must be written back


@dataclass
class _Victims:
    """Where a claiming victim choice records what each claimed slot held."""

    victim_keys: cupy.ndarray
    victim_dirty: cupy.ndarray
    mark: bool                   # claimed slots start dirty


class GpuCache(SetAssociativeCache):
    """Rows spill into the next set as on the host, through `choose_slots` (the path a table
    takes); `find_or_insert`, which claims its slots inside the victim kernel, does not spill.
    The probe kernels look in the next set of a set marked `spilled`."""

    def __init__(self, config: CacheConfig, row_bytes: int, device: int = 0, align: int | None = None):
        if config.ways > 32:
            raise InvalidArgument(f"cache.ways: the GPU cache supports at most 32 ways, got {config.ways}")
        if row_bytes % 16:
            raise InvalidArgument(f"row_bytes: must be a multiple of 16, got {row_bytes}")
        self.device = cupy.cuda.Device(device)
        self.pitch = slab_pitch(row_bytes, align)
        self.header_at = row_bytes - HEADER_BYTES      # where a row's header lies in the slab (rotated)
        with self.device:
            super().__init__(config, row_bytes, xp=cupy)
            if self.uses is None:                 # the kernels take a use count per slot whatever the order
                self.uses = cupy.zeros(self.capacity, dtype=cupy.int64)
            self.kernels = kernels_for(self.device.id)
            self._heads = cupy.zeros(self.num_sets, dtype=cupy.uint64)   # per-set lists of a batch's new ids
            self._marks = cupy.zeros(self.capacity, dtype=cupy.uint32)   # slots a gradient batch hit (by epoch)
            self._epoch = 0
        self.lfu = config.policy == "lfu"
        self._touch = COUNT_USES if self.lfu else TOUCH   # LRU reads only the age stamp

    def _new_slab(self, n: int, row_bytes: int) -> cupy.ndarray:
        """Rows `pitch` apart (CuPy allocations start 256-byte aligned)."""
        return cupy.zeros(n * self.pitch, dtype=cupy.uint8).reshape(n, self.pitch)[:, :row_bytes]

    @property
    def headers(self) -> int:
        """Device address of slot 0's row header (slot s's lies `pitch` * s after it)."""
        return self.slab.data.ptr + self.header_at

    def slab_offset(self, offset: int) -> int:
        """Where byte `offset` of a stored row lies in its slab row."""
        return (offset - HEADER_BYTES) % self.row_bytes

    def _pieces(self, offset: int, nbytes: int) -> list[tuple[int, int, int]]:
        """(slab offset, offset from `offset`, bytes) of the slab's pieces of stored bytes
        [offset, offset + nbytes): one piece, or two for a range from inside the header on."""
        if offset >= HEADER_BYTES or offset + nbytes <= HEADER_BYTES:
            return [(self.slab_offset(offset), 0, nbytes)]
        head = HEADER_BYTES - offset
        return [(self.header_at + offset, 0, head), (0, head, nbytes - head)]

    def _probe_index(self, n: int) -> None:
        """The kernels probe whole sets in one pass: no hints or fingerprints."""
        self.hints = None

    def _ids(self, ids) -> cupy.ndarray:
        return device_ids(ids)

    def set_of(self, ids):
        """The host cache's set function, computed by the kernels' own copy of it."""
        with self.device:
            ids = self._ids(ids)
            out = cupy.empty(len(ids), dtype=cupy.int64)
            self.kernels.sets_of(ids, self.num_sets, out)
            return out

    # --- lookup ------------------------------------------------------------

    def probe(self, ids, missed=None):
        """Slot of each id, -1 where it is not cached. Pure: changes no stamp. `missed` (a device
        int32[2], zeroed): [1] is set when an id is not cached."""
        with self.device:
            ids = self._ids(ids)
            slots = cupy.empty(len(ids), dtype=cupy.int64)
            self.kernels.probe(self.keys, self.occupied, ids, self.num_sets, self.ways, slots, repeated=missed,
                               spilled=self.spilled)
            return slots

    def probe_and_touch(self, ids, now: int | None = None, skip=None):
        """`probe`, then `touch` of the hits, in one kernel (duplicates allowed). Given `now`,
        also records the access in each hit row's header once (count + 1, last_access = now).
        `skip`: a device int32 that, when set by earlier work, makes the kernel do nothing
        (its slots are then not written)."""
        with self.device:
            ids = self._ids(ids)
            slots = cupy.empty(len(ids), dtype=cupy.int64)
            flags = self._touch if now is None else self._touch | HEADERS
            self.kernels.probe(self.keys, self.occupied, ids, self.num_sets, self.ways, slots,
                               last_used=self.last_used, uses=self.uses, tick=self.tick, flags=flags,
                               headers=self.headers, row_bytes=self.pitch, now=now or 0, spilled=self.spilled,
                               skip=skip)
            return slots

    def touch(self, slots) -> None:
        """Record a use of cached slots (duplicates allowed): the stamp by one kernel; LFU's use
        counts as on the host."""
        with self.device:
            slots = self._ids(slots)
            self.kernels.stamp_slots(slots, self.last_used, self.tick)
            if self.lfu:
                self.order.on_hit(self, slots)

    def set_dirty(self, slots, value: bool) -> None:
        with self.device:
            self.kernels.flag_slots(self._ids(slots), self.dirty, value)

    def occupancy(self) -> int:
        return self._count(self.kernels.count_set, self.occupied)

    def locked_rows(self) -> int:
        return self._count(self.kernels.count_locked, self.locks)

    def dirty_rows(self) -> int:
        return self._count(self.kernels.count_set, self.dirty)

    def _count(self, kernel, values) -> int:
        with self.device:
            total = cupy.zeros(1, dtype=cupy.uint64)
            kernel(values, total)
            return int(download(total)[0])

    # --- insert --------------------------------------------------------------

    def _link(self, ids, flags: int, claim: _Victims | None = None):
        """Probe with new ids linked into per-set lists, then choose their victims;
        returns (slots, hit). Without `claim`, reads the victims' metadata only; with it,
        claims the chosen slots in the same kernel (recording what they held in `claim`)."""
        n = len(ids)
        self._epoch += 1
        slots = cupy.empty(n, dtype=cupy.int64)
        hit = cupy.empty(n, dtype=cupy.bool_)
        next_ = cupy.empty(n, dtype=cupy.int32)
        self.kernels.probe(self.keys, self.occupied, ids, self.num_sets, self.ways, slots, hit_out=hit,
                           last_used=self.last_used, uses=self.uses, tick=self.tick, flags=flags | LINK,
                           heads=self._heads, next_=next_, epoch=self._epoch,
                           cleared=None if claim is None else claim.victim_dirty, spilled=self.spilled)
        self.kernels.choose_victims(ids, self.keys, self.occupied, self.locks, self.last_used, self.uses,
                                    self.num_sets, self.ways, self.lfu, self.tick, self._heads, next_, hit,
                                    self._epoch, slots, dirty=self.dirty, mark_dirty=claim is not None and claim.mark,
                                    victim_keys=None if claim is None else claim.victim_keys,
                                    victim_dirty=None if claim is None else claim.victim_dirty)
        return slots, hit

    def choose_slots(self, ids, clean: bool = False) -> Eviction:
        """Pick a slot for each new (unique, uncached) id. Changes nothing yet:
        the caller writes the dirty victims back, then calls `fill`. With `clean`, the
        displaced clean rows come too."""
        with self.device:
            ids = self._ids(ids)
            if len(ids) == 0:
                slots = cupy.zeros(0, cupy.int64)
            else:
                slots = self._link(ids, ALL_NEW)[0]
                if self.spills:
                    self._spill_new(ids, slots)
            return self._eviction(slots, clean)

    def _spill_new(self, ids, slots) -> None:
        """The host cache's spill (`SetAssociativeCache._spill`), on the host: the ids that would
        displace a row (or got no way) and the ways of their next sets come down, the same
        compiled pass chooses, and the changed slots go up. Nothing moves when none would: one
        kernel counts the ids that want a way where the next set has a free one (a full cache,
        the usual case, then costs that kernel and one read of the count)."""
        if self.num_sets == 1:
            return
        count = cupy.zeros(1, dtype=cupy.uint64)
        self.kernels.spill_candidates(ids, slots, self.occupied, self.locks, self.num_sets, self.ways, count)
        if not int(download(count)[0]):
            return
        wanting = cupy.flatnonzero((slots < 0) | self.occupied[cupy.maximum(slots, 0)])
        near = (self.set_of(ids[wanting]) + 1) % self.num_sets
        occupied = self.occupied.reshape(self.num_sets, self.ways)[near]
        locks = self.locks.reshape(self.num_sets, self.ways)[near]
        given = cupy.sort(slots[(slots >= 0) & ~self.occupied[cupy.maximum(slots, 0)]]).get()
        chosen = spill_into(occupied.get(), locks.get(), np.arange(len(near)), near.get(), self.ways, given)
        moved = chosen >= 0
        if moved.any():
            slots[wanting[cupy.asarray(np.flatnonzero(moved))]] = cupy.asarray(chosen[moved])

    def find_or_insert(self, ids, dirty: bool = False) -> Claim:
        """Probe unique ids, touch the hits and give each new id a slot (its key and
        stamps set; its row bytes untouched). Before writing new rows, take the
        displaced dirty rows with `displaced_rows` and write them back."""
        with self.device:
            ids = self._ids(ids)
            n = len(ids)
            victims = _Victims(cupy.empty(n, dtype=cupy.int64), cupy.empty(n, dtype=cupy.bool_), dirty)
            slots, hit = self._link(ids, self._touch, victims)
            return Claim(slots, hit, victims.victim_keys, victims.victim_dirty)

    def displaced_rows(self, claim: Claim) -> tuple[cupy.ndarray, cupy.ndarray]:
        """(ids, rows) of the dirty rows a claim displaced, in batch order."""
        with self.device:
            where = cupy.nonzero(claim.victim_dirty)[0]
            return claim.victim_keys[where], self.gather_rows(claim.slots[where])

    def fill(self, slots, ids, rows, dirty) -> None:
        """Place rows in the slots `choose_slots` gave (entries of -1 are skipped)."""
        with self.device:
            slots, ids = self._ids(slots), self._ids(ids)
            rows = cupy.asarray(rows)
            if not rows.flags.c_contiguous:
                rows = cupy.ascontiguousarray(rows)
            self.scatter_rows(slots, rows)
            if isinstance(dirty, np.ndarray) and (not dirty.any() or dirty.all()):
                dirty = bool(len(dirty) and dirty[0])      # one value for every row: no flags to upload
            flags = dirty if getattr(dirty, "ndim", 0) else None
            self.kernels.fill_meta(slots, ids, self.keys, self.occupied, self.dirty,
                                   None if flags is None else cupy.asarray(flags, dtype=cupy.bool_),
                                   bool(dirty) if flags is None else False, self.last_used, self.uses, self.tick,
                                   self.num_sets, self.ways, self.spilled)

    def _eviction(self, slots, clean: bool) -> Eviction:
        """The dirty rows (and, with `clean`, the clean ones) that `slots` displace, in batch
        order: one kernel packs their slots and counts them; reading the counts is the one wait."""
        packed = cupy.empty(len(slots), dtype=cupy.int64)
        counts = cupy.empty(2, dtype=cupy.int64)
        self.kernels.pack_victims(slots, self.occupied, self.dirty, packed, counts)
        soiled, quiet = (int(v) for v in download(counts))
        displaced = packed[:soiled]
        choice = Eviction(slots, self.keys[displaced], self.gather_rows(displaced))
        if clean:
            quiet_slots = packed[soiled:soiled + quiet]
            choice.clean_ids, choice.clean_rows = self.keys[quiet_slots], self.gather_rows(quiet_slots)
        return choice

    # --- rows ------------------------------------------------------------------

    def gather(self, slots, offset: int, nbytes: int, out: cupy.ndarray) -> cupy.ndarray:
        """Bytes [offset, offset + nbytes) of each slot's row into the rows of `out`
        (C-contiguous, nbytes per row); rows whose slot is -1 are left as they are."""
        with self.device:
            slots = self._ids(slots)
            if (offset, nbytes) == (0, self.row_bytes):       # whole rows: unrotated in one launch
                self.kernels.copy_rows(self.slab, slots, self.pitch, 0, out, None, nbytes, 0, nbytes, len(slots),
                                       rotate=self.header_at)
                return out
            for at, within, size in self._pieces(offset, nbytes):
                self.kernels.copy_rows(self.slab, slots, self.pitch, at, out, None, nbytes, within, size, len(slots))
            return out

    def touch_headers(self, slots, now: int) -> None:
        """Record an access (count + 1, last_access = now) in the headers of unique cached `slots`."""
        with self.device:
            slots = self._ids(slots)
            self.kernels.touch_headers(self.headers, self.pitch, slots, len(slots), now)

    def gather_rows(self, slots) -> cupy.ndarray:
        out = cupy.empty((len(slots), self.row_bytes), dtype=cupy.uint8)
        return self.gather(slots, 0, self.row_bytes, out)

    def scatter(self, slots, src: cupy.ndarray, offset: int, nbytes: int) -> None:
        """Rows of `src` (C-contiguous, nbytes each) into bytes [offset, offset + nbytes)
        of each slot's row; slots of -1 are skipped."""
        with self.device:
            slots = self._ids(slots)
            if (offset, nbytes) == (0, self.row_bytes):       # whole rows: rotated in one launch
                self.kernels.copy_rows(src, None, nbytes, 0, self.slab, slots, self.pitch, 0, nbytes, len(slots),
                                       rotate=HEADER_BYTES)
                return
            for at, within, size in self._pieces(offset, nbytes):
                self.kernels.copy_rows(src, None, nbytes, within, self.slab, slots, self.pitch, at, size, len(slots))

    def scatter_rows(self, slots, rows: cupy.ndarray) -> None:
        self.scatter(slots, rows, 0, self.row_bytes)

    # --- optimizer ---------------------------------------------------------------

    def optimizer_step(self, slots, grads, optimizer: OptimizerConfig, layout: RowLayout, now: int | None = None,
                       mark_dirty: bool = True, rows: cupy.ndarray | None = None) -> None:
        """One fused optimizer step per row: row `slots[i]` takes gradient row `grads[i]`
        (float32, [n, dim], slots unique; -1 skipped). Updates weights and state in place,
        bumps the header's step (and, given `now`, its count and last_access) and marks
        the slots dirty. With `rows`, steps those rows instead of the slab; `slots` None
        then means rows 0..n-1."""
        with self.device:
            grads = cupy.ascontiguousarray(cupy.asarray(grads), dtype=cupy.float32)
            n = len(grads)
            slots = None if slots is None else self._ids(slots)
            if grads.shape != (n, layout.dim) or (slots is not None and len(slots) != n):
                raise InvalidArgument(f"grads: expected shape ({n}, {layout.dim}), got {grads.shape}")
            dirty = self.dirty if (mark_dirty and rows is None) else None
            where = self._step_rows(layout) if rows is None else (rows.data.ptr, layout.row_bytes,
                                                                   layout.weight_offset, layout.state_offset)
            self.kernels.optimizer_step(optimizer, dtype_name(layout.dtype), *where, slots, grads, n, layout.dim,
                                        dirty, now or 0, now is not None)

    def _step_rows(self, layout: RowLayout) -> tuple[int, int, int, int]:
        """(headers, pitch, weights and state from a header) of the slab's rows, for the fused step."""
        return (self.headers, self.pitch, self.slab_offset(layout.weight_offset) - self.header_at,
                self.slab_offset(layout.state_offset) - self.header_at)

    def apply_gradients(self, ids, grads, optimizer: OptimizerConfig, layout: RowLayout,
                        now: int | None = None) -> tuple[cupy.ndarray, cupy.ndarray]:
        """Gradient rows of a batch (duplicate ids allowed) applied to the cached rows.
        Every position is probed (+touch), marking its slot; a batch whose ids are unique
        (what a client that de-duplicates sends) is then stepped row by row, with no grouping
        and no wait before the step. Otherwise that step does nothing and the positions are
        grouped by slot (`slot_groups`), each cached slot's gradient rows summed, in batch
        order, by the fused step as it reads them (no summed copy in memory).
        Returns the unique ids and their slots (-1: not cached, not stepped): a unique batch
        in batch order; else the cached ids in slot order, then the uncached ones."""
        with self.device:
            ids = self._ids(ids)
            grads = cupy.ascontiguousarray(cupy.asarray(grads), dtype=cupy.float32)
            if grads.shape != (len(ids), layout.dim):
                raise InvalidArgument(f"grads: expected shape ({len(ids)}, {layout.dim}), got {grads.shape}")
            if len(ids) == 0:
                return ids, cupy.zeros(0, dtype=cupy.int64)
            self._epoch += 1
            slots = cupy.empty(len(ids), dtype=cupy.int64)
            repeated = cupy.zeros(2, dtype=cupy.int32)   # a cached slot hit twice; an uncached id
            self.kernels.probe(self.keys, self.occupied, ids, self.num_sets, self.ways, slots,
                               last_used=self.last_used, uses=self.uses, tick=self.tick, flags=self._touch | MARK,
                               epoch=self._epoch, marks=self._marks, repeated=repeated, spilled=self.spilled)

            def step(idx, segments=None, skip=None):     # the step records the access in the header
                self.kernels.optimizer_step(optimizer, dtype_name(layout.dtype), *self._step_rows(layout), idx,
                                            grads, len(ids), layout.dim, self.dirty, now or 0, now is not None,
                                            segments=segments, skip=skip)

            step(slots, skip=repeated)
            twice, missed = download(repeated)           # the one wait, with the step already queued
            if not twice:
                return _unique_misses(ids, slots) if missed else (ids, slots)
            groups = slot_groups(self, ids, slots)
            step(groups.slots, segments=(groups.order, groups.starts))
            return groups.unique(ids, slots)


@dataclass
class SlotGroups:
    """A batch's positions grouped by the slot their id has (-1, uncached, sorts first).
    Arrays are batch-sized: `slots` is -1 and `starts` is n past the last group, so a step
    over all n entries needs no count from the device."""

    order: cupy.ndarray     # [n] batch positions sorted by slot (stable: batch order within a slot)
    starts: cupy.ndarray    # [n] where each group's positions begin in `order`
    slots: cupy.ndarray     # [n] each group's slot
    uniq: cupy.ndarray      # [n] each group's id
    ends: cupy.ndarray      # [n] the inclusive scan of group heads: ends[-1] groups

    def unique(self, ids: cupy.ndarray, slots_at: cupy.ndarray) -> tuple[cupy.ndarray, cupy.ndarray]:
        """(unique ids, their slots): the cached groups, then the uncached ids made unique.
        The one wait of the call: the group count and the first group's slot."""
        count, first = (int(v) for v in download(cupy.stack((self.ends[-1], self.slots[0]))))
        if first >= 0:
            return self.uniq[:count], self.slots[:count]
        return _unique_misses(ids, slots_at, self.uniq[1:count], self.slots[1:count])   # misses: group 0


def _unique_misses(ids: cupy.ndarray, slots: cupy.ndarray, cached_ids: cupy.ndarray | None = None,
                   cached_slots: cupy.ndarray | None = None) -> tuple[cupy.ndarray, cupy.ndarray]:
    """(ids, slots) of the cached ids (given, or those of `slots` >= 0), then each uncached id once."""
    if cached_ids is None:
        hit = slots >= 0
        cached_ids, cached_slots = ids[hit], slots[hit]
    missing = cupy.unique(ids[slots < 0])
    return (cupy.concatenate((cached_ids, missing)),
            cupy.concatenate((cached_slots, cupy.full(len(missing), -1, dtype=cupy.int64))))


def slot_groups(cache: GpuCache, ids: cupy.ndarray, slots_at: cupy.ndarray) -> SlotGroups:
    """Group batch positions by slot: a radix sort of the slots as 32-bit keys (half the
    passes of the 64-bit mixed ids `segments_of` sorts) and two small kernels; no wait."""
    with cache.device:
        n, k = len(ids), cache.kernels
        keys = slots_at.astype(cupy.int32) if cache.capacity < 2**31 else slots_at
        order = cupy.argsort(keys)
        heads = cupy.empty(n, dtype=cupy.int64)
        k.segment_heads(slots_at.view(cupy.uint64), order, heads)
        ends = cupy.cumsum(heads)
        starts = cupy.full(n, n, dtype=cupy.int64)
        slots = cupy.full(n, -1, dtype=cupy.int64)
        uniq = cupy.empty(n, dtype=cupy.int64)
        k.segment_index(ids, order, heads, ends, starts, uniq, None, values=slots_at, uniq_values=slots)
        return SlotGroups(order, starts, slots, uniq, ends)


def download_all(arrays: list[cupy.ndarray]) -> list[np.ndarray]:
    """Host copies of device arrays, each in a page-locked buffer of its own, with one wait (a
    plain `.get()` stages through pageable memory: slower, for a few bytes as for many)."""
    out = [cupyx.empty_pinned(a.shape, dtype=a.dtype) for a in arrays]
    for array, host in zip(arrays, out, strict=True):
        if array.size:
            cupy.ascontiguousarray(array).get(out=host, blocking=False)
    cupy.cuda.get_current_stream().synchronize()
    return out


def download(array: cupy.ndarray) -> np.ndarray:
    """A host copy of a device array, in a page-locked buffer of its own."""
    return download_all([array])[0]


@dataclass
class Segments:
    """A batch's ids grouped by id: sorted by their mix (the cache's set order)."""

    uniq: cupy.ndarray      # [u] the unique ids, in set order
    order: cupy.ndarray     # [n] batch positions sorted by id
    starts: cupy.ndarray    # [u] where each id's positions begin in `order`
    inverse: cupy.ndarray   # [n] each batch position's index in `uniq`


def segments_of(cache: GpuCache, ids: cupy.ndarray) -> Segments:
    """One radix sort of the mixed ids and three small kernels; one wait, for the count
    of unique ids, read through a pinned buffer."""
    with cache.device:
        n, k = len(ids), cache.kernels
        mixed = cupy.empty(n, dtype=cupy.uint64)
        k.mix_ids(ids, mixed)
        order = cupy.argsort(mixed)
        heads = cupy.empty(n, dtype=cupy.int64)
        k.segment_heads(mixed, order, heads)
        ends = cupy.cumsum(heads)
        starts, uniq, inverse = (cupy.empty(n, dtype=cupy.int64) for _ in range(3))
        k.segment_index(ids, order, heads, ends, starts, uniq, inverse)
        count = int(download(ends[-1:])[0]) if n else 0
        return Segments(uniq[:count], order, starts[:count], inverse)


def sum_duplicates(cache: GpuCache, ids: cupy.ndarray, grads: cupy.ndarray
                   ) -> tuple[cupy.ndarray, cupy.ndarray, cupy.ndarray]:
    """Unique ids, the float32 sum of each one's gradient rows, and each id's position among
    them, on the device (for callers holding device gradients). Unique ids come in the order
    of their mix, which is the cache's set order: a step then walks the slab forward.
    Each id's rows are summed by one warp (a segmented sum: no atomics)."""
    with cache.device:
        seg = segments_of(cache, device_ids(ids))
        grads = cupy.ascontiguousarray(cupy.asarray(grads), dtype=cupy.float32)
        out = cupy.empty((len(seg.uniq), grads.shape[1]), dtype=cupy.float32)
        cache.kernels.sum_segments(grads, seg.order, seg.starts, out)
        return seg.uniq, out, seg.inverse


def device_ids(ids) -> cupy.ndarray:
    """Ids (NumPy or CuPy, any integer dtype) as a contiguous int64 array on the current device."""
    return cupy.ascontiguousarray(cupy.asarray(ids), dtype=cupy.int64)


def dtype_name(dtype: np.dtype) -> str:
    from .dtypes import WEIGHT_DTYPES

    for name, known in WEIGHT_DTYPES.items():
        if known == dtype:
            return name
    raise InvalidArgument(f"dtype: unsupported {dtype}")
