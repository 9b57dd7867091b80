"""This client's shared-memory segments for the same-host path: created, lent one call at a time, unlinked.

A segment is a POSIX shared-memory block (`multiprocessing.shared_memory`) named
`kvstore-` and 32 random hex digits. The client owns it: it creates it, writes its
inputs there, reads the rows the server wrote, and unlinks it on close, when it is
dropped or when the process exits (or, if the process is killed, Python's resource
tracker does). Before a segment's first use the server proves it can map it
(AttachSegment: it must find the token the client wrote at its start), so a server on
another host, container or IPC namespace answers no and the client takes the network path.

One call holds one segment at a time (`SegmentPool.lease`), so concurrent calls of
one client never share a region. A segment goes back to the pool only after its
call was answered, which the server does only once it has written every row; a call
that ends any other way (cancelled, timed out, the connection lost) may leave the
server still writing, so its segment is retired: detached and unlinked, never reused.
"""
from __future__ import annotations

import ctypes
import math
import os
import secrets
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import shared_memory

import numpy as np
from kvstore_proto.tensors import WIRE_DTYPES, WireError, wire_name
from kvstore_proto.v1 import kvstore_pb2 as pb

from .errors import InvalidArgumentError

PREFIX = "kvstore-"
TOKEN_BYTES = 16
ALIGN = 64                   # arrays start on cache lines
MIN_SEGMENT_BYTES = 1 << 20
MAX_LENT = 16                # segments lent to results at once; past it results are copies


class NotAttached(Exception):
    """The server cannot use this client's segments; the message says why."""


def wire_dtype(array: np.ndarray, field: str) -> str:
    try:
        return wire_name(array.dtype, field)
    except WireError as exc:
        raise InvalidArgumentError(message=str(exc)) from None


class Segment:
    """One shared-memory segment, filled front to back by the call that holds it."""

    def __init__(self, nbytes: int):
        self.shm = shared_memory.SharedMemory(name=PREFIX + secrets.token_hex(16), create=True, size=nbytes)
        self.name = self.shm.name.lstrip("/")
        self.size = self.shm.size
        self.used = 0
        self.owner = None             # the base of arrays lent over it (SegmentPool.lend), made once
        self.idle_refs = 0            # sys.getrefcount(owner) while no such array is alive
        # Unlinked and unmapped when closed, when dropped unclosed, or when the process exits with it
        # open (a client never closed): no segment left in /dev/shm, no warning at exit. Only by
        # this process: a forked child (a data loader's worker) ending must not unlink its parent's.
        self._unlink_and_unmap = weakref.finalize(self, _release, self.shm, os.getpid())

    def array(self, shape: tuple[int, ...], dtype: str) -> tuple[np.ndarray, pb.SharedArray]:
        """A fresh region of the segment: a writable view and its description for the server."""
        view, offset = self.place(shape, dtype)
        return view, pb.SharedArray(dtype=dtype, shape=shape, offset=offset)

    def place(self, shape: tuple[int, ...], dtype: str) -> tuple[np.ndarray, int]:
        """A fresh region of the segment: a writable view and its offset (`array` without the
        message, for a caller that sends the same one again)."""
        wire = WIRE_DTYPES[dtype]
        offset = _aligned(self.used)
        nbytes = math.prod(shape) * wire.itemsize      # Python ints: no overflow, no array per call
        if offset + nbytes > self.size:
            raise ValueError(f"segment {self.name}: {nbytes} bytes at {offset} exceed its {self.size}")
        self.used = offset + nbytes
        return np.ndarray(shape, wire, buffer=self.shm.buf, offset=offset), offset

    def put(self, array: np.ndarray, field: str) -> pb.SharedArray:
        """`array` copied into a fresh region."""
        view, spec = self.array(array.shape, wire_dtype(array, field))
        view[...] = array
        return spec

    def write_token(self, token: bytes) -> None:
        self.shm.buf[:len(token)] = token

    def abandon(self) -> None:
        """Retired without the server's word that it let go: the server also drops unlinked segments."""
        self.close()

    def close(self) -> None:
        """Unlinked and unmapped; the mapping outlives this while an array over it does."""
        self.owner = None        # its export of the mapping (gone now unless a lent array keeps it)
        self._unlink_and_unmap()


def _release(shm: shared_memory.SharedMemory, creator: int) -> None:
    """Unlink `shm` (in the process that created it) and close its mapping now or, while arrays
    over it are alive, leave it to them: their base holds an export of the memoryview `shm` keeps
    (`_buf`), which holds the mmap (`_mmap`); with `shm`'s own references dropped, the last array
    to go unmaps it, and `shm` has nothing left whose close could fail (SharedMemory's __del__
    would print a BufferError)."""
    try:
        shm.close()
    except BufferError:
        shm._buf = shm._mmap = None          # the arrays' references keep both alive
        shm.close()                          # its file descriptor only
    if os.getpid() != creator:
        return
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


def region_bytes(*arrays: tuple[tuple[int, ...], int]) -> int:
    """Bytes a segment needs for arrays of these (shape, itemsize), each aligned."""
    return sum(math.prod(shape) * itemsize + ALIGN for shape, itemsize in arrays)


def region_offsets(*arrays: tuple[tuple[int, ...], int]) -> list[int]:
    """Where `place` puts arrays of these (shape, itemsize), one after the other, in a fresh segment."""
    offsets, used = [], 0
    for shape, itemsize in arrays:
        offsets.append(_aligned(used))
        used = offsets[-1] + math.prod(shape) * itemsize
    return offsets


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


class SegmentPool:
    """Free segments of one client; each call takes one (`lease`) and gives it back when answered."""

    def __init__(self, attach: Callable[[Segment, bytes], str], detach: Callable[[str], None],
                 make: Callable[[int], Segment] = Segment):
        self._attach = attach           # (segment, token) -> "" when the server can use it, else why not
        self._detach = detach
        self._make = make               # bytes -> a new segment (or GPU buffer: device_memory.py)
        self._free: list[Segment] = []
        self._lent: list[Segment] = []  # lent to arrays, some perhaps gone by now (`_collect_returned`)
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def lease(self, nbytes: int) -> Iterator[Segment]:
        """A segment of at least `nbytes`, this call's alone. Back to the pool when the block ends
        normally; retired (never reused) when it raises: the server may still be writing into it."""
        segment = self.take(nbytes)
        try:
            yield segment
        except BaseException:
            self.retire(segment)
            raise
        self.give(segment)

    def give(self, segment: Segment) -> None:
        """Back to the pool: its call was answered, the server is done with it."""
        with self._lock:
            if not self._closed:
                self._free.append(segment)
                return
        self.retire(segment)

    def lend(self, segment: Segment, offset: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """A writable array of `shape` over `segment` from `offset`, which owns the segment: it comes
        back to the pool once that array and every view of it (a torch tensor over it too) are gone."""
        return self.lend_regions(segment, [(offset, shape, dtype)])[0]

    def lend_regions(self, segment: Segment, regions: list[tuple[int, tuple[int, ...], str]]) -> list[np.ndarray]:
        """Writable arrays over `segment`, one per (offset, shape, dtype), which together own it: it
        comes back to the pool once all of them and their views are gone. Their memory is one ctypes
        object exported from the segment, made once, the base every view keeps (NumPy collapses a
        chain of array bases, not this one). The segment is lent while anything but the segment
        refers to that object: counted when a segment is taken, instead of a finalizer per lent
        array (whose set-up and call cost a lookup as much as the rest of its Python,
        docs/same-host.md)."""
        if segment.owner is None:
            segment.owner = (ctypes.c_char * segment.size).from_buffer(segment.shm.buf)
            segment.idle_refs = sys.getrefcount(segment.owner)
        arrays = [np.ndarray(shape, WIRE_DTYPES[dtype], buffer=segment.owner, offset=offset)
                  for offset, shape, dtype in regions]
        with self._lock:                     # listed once its arrays exist: never counted back before
            self._lent.append(segment)
        return arrays

    def can_lend(self) -> bool:
        """Whether fewer than MAX_LENT segments are lent now (those listed are counted back only
        when that many are listed: `take` counts them anyway)."""
        return len(self._lent) < MAX_LENT or self.lent() < MAX_LENT

    def lent(self) -> int:
        """Segments lent to arrays still alive (each holds a file descriptor and a mapping: callers
        copy instead of lending past a few, so a caller keeping every result cannot run out of them)."""
        with self._lock:
            self._collect_returned()
            return len(self._lent)

    def retire(self, segment: Segment) -> None:
        """Detached and unlinked, never reused (its call may still be running on the server)."""
        try:
            self._detach(segment.name)
        except Exception:            # noqa: BLE001 - best effort: see `abandon`
            segment.abandon()
            return
        segment.close()

    def check(self) -> None:
        """Make (or reuse) a small segment the server has attached; NotAttached says why not."""
        with self.lease(MIN_SEGMENT_BYTES):
            pass

    def close(self) -> None:
        with self._lock:
            self._collect_returned()
            self._closed, free, self._free, lent, self._lent = True, self._free, [], self._lent, []
        for segment in free:
            self.retire(segment)
        for segment in lent:
            segment.close()                  # unlinked (the server drops unlinked segments); unmapped
                                             # when the last array lent over it goes

    def _collect_returned(self) -> None:
        """Lent segments whose arrays are all gone join the free ones (call with the lock held)."""
        if self._lent:
            back = [segment for segment in self._lent if sys.getrefcount(segment.owner) == segment.idle_refs]
            if back:
                self._lent = [segment for segment in self._lent if segment not in back]
                self._free += back

    def take(self, nbytes: int) -> Segment:
        """A free segment of at least `nbytes` (a new one, attached, if none fits); `give` or `retire` it."""
        with self._lock:
            self._collect_returned()
            fits = [s for s in self._free if s.size >= nbytes]
            if fits:
                segment = min(fits, key=lambda s: s.size)
                self._free.remove(segment)
                segment.used = 0
                return segment
            small = self._free.pop() if self._free else None     # outgrown: replaced by a larger one
        if small is not None:
            self.retire(small)
        return self._new(max(MIN_SEGMENT_BYTES, 1 << (nbytes - 1).bit_length()))

    def _new(self, nbytes: int) -> Segment:
        segment = self._make(nbytes)
        token = secrets.token_bytes(TOKEN_BYTES)
        try:
            segment.write_token(token)
            reason = self._attach(segment, token)
        except BaseException:
            segment.close()
            raise
        if reason:
            segment.close()
            raise NotAttached(reason)
        return segment
