"""Clients' shared-memory segments, as the same-host path sees them: mapped by name, checked, cached.

A client on the server's machine creates a POSIX shared-memory segment (its name:
`kvstore-` and 32 lowercase hex digits) and names regions of it in its calls. Here
the server maps a segment once and keeps the mapping (at most `MAX_MAPPED`, least
recently used dropped first; a segment its client unlinked is dropped at the next
attach). Every region a call names is checked against the mapping with Python
integers (no overflow): dtype, shape, alignment, and that it lies wholly inside.
Anything wrong is InvalidArgument naming the field.

Segments are mapped through `mmap` on the file under /dev/shm rather than
`multiprocessing.shared_memory`: on Python < 3.13 that class registers every name
it opens with the resource tracker, which would unlink the client's segment when
the server exits. A segment must be a regular file owned by the server's own user:
a process that could shrink it under the mapping (which faults the server on its
next access) could as well signal the server.
"""
from __future__ import annotations

import mmap
import os
import re
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from kvstore_proto.tensors import WIRE_DTYPES, WireError, check_dtype, element_count
from kvstore_proto.v1 import kvstore_pb2 as pb

from kvstore.errors import InvalidArgument

SEGMENT_NAME = re.compile(r"kvstore-[0-9a-f]{32}")
SHM_DIR = "/dev/shm"              # where Linux keeps POSIX shared memory (shm_open opens files here)
MAX_MAPPED = 64                   # segments kept mapped at once
MAX_SEGMENT_BYTES = 1 << 40       # a larger "segment" is refused rather than mapped
TOKEN_BYTES = 16                  # the attach token at the start of a segment


class Unmappable(Exception):
    """A segment this server cannot map; the message says why (the client falls back)."""


@dataclass
class Segment:
    """One mapped segment: the open file (to notice shrinking or unlinking) and its mapping."""

    name: str
    fd: int
    size: int
    mapping: mmap.mmap

    def close(self) -> None:
        """Close the file. The mapping is not closed here: it goes with the last reference to it,
        so a call still holding this segment (a doorbell thread, a store thread) keeps valid memory."""
        os.close(self.fd)

    def unlinked(self) -> bool:
        return os.fstat(self.fd).st_nlink == 0

    def check_size(self) -> None:
        """The file must still span the mapping: touching pages past its end would fault the server."""
        if os.fstat(self.fd).st_size < self.size:
            raise InvalidArgument(f"segment: {self.name!r} shrank below the {self.size} bytes mapped; "
                                  "make a new segment instead of truncating one")


def check_name(name: str, field: str = "segment") -> str:
    if not isinstance(name, str) or not SEGMENT_NAME.fullmatch(name):
        shown = name[:48] + "..." if len(name) > 48 else name
        raise InvalidArgument(f"{field}: {shown!r} is not a kvstore segment name ('kvstore-' and 32 lowercase "
                              "hex digits)")
    return name


def _open(name: str) -> Segment:
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Unmappable(f"no segment {name!r} on the server's machine (another host, container or IPC "
                         "namespace?)") from None
    except OSError as exc:
        raise Unmappable(f"cannot open segment {name!r}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise Unmappable(f"segment {name!r} is not a shared-memory file of the server's user")
        if not 0 < info.st_size <= MAX_SEGMENT_BYTES:
            raise Unmappable(f"segment {name!r} has {info.st_size} bytes; expected 1 to {MAX_SEGMENT_BYTES}")
        return Segment(name, fd, info.st_size, mmap.mmap(fd, info.st_size))
    except BaseException:
        os.close(fd)
        raise


class Segments:
    """The segments this server has mapped, by name: used on the event loop and in the doorbell's
    connection threads (hence the lock; an unmapping waits for no call, see Segment.close)."""

    def __init__(self, max_mapped: int = MAX_MAPPED):
        self.max_mapped = max_mapped
        self._mapped: OrderedDict[str, Segment] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._mapped)

    def attach(self, name: str, token: bytes) -> str:
        """Map `name` and check that it starts with `token`; "" when usable, else why not."""
        check_name(name)
        if len(token) != TOKEN_BYTES:
            raise InvalidArgument(f"token: expected {TOKEN_BYTES} bytes, got {len(token)}")
        with self._lock:
            self._drop_unlinked()
            try:
                segment = self._mapped.get(name) or self._map(name)
            except Unmappable as exc:
                return str(exc)
        if segment.size < TOKEN_BYTES or segment.mapping[:TOKEN_BYTES] != token:
            self.detach(name)
            return f"segment {name!r} on the server's machine does not hold the client's token (another host?)"
        return ""

    def get(self, name: str) -> Segment:
        """The mapped segment `name` (mapped now if need be), or InvalidArgument naming `segment`."""
        with self._lock:
            segment = self._mapped.get(name)            # a mapped name was checked when it was mapped
            if segment is None:
                check_name(name)
                try:
                    segment = self._map(name)
                except Unmappable as exc:
                    raise InvalidArgument(f"segment: {exc}") from None
            self._mapped.move_to_end(name)
            segment.check_size()                      # under the lock: its file is not closed meanwhile
        return segment

    def detach(self, name: str) -> None:
        check_name(name)
        with self._lock:
            segment = self._mapped.pop(name, None)
            if segment is not None:
                segment.close()

    def close(self) -> None:
        with self._lock:
            while self._mapped:
                self._mapped.popitem()[1].close()

    def _map(self, name: str) -> Segment:
        segment = _open(name)
        self._mapped[name] = segment
        while len(self._mapped) > self.max_mapped:
            self._mapped.popitem(last=False)[1].close()
        return segment

    def _drop_unlinked(self) -> None:
        for name in [name for name, segment in self._mapped.items() if segment.unlinked()]:
            self._mapped.pop(name).close()


def region(segment: Segment, spec: pb.SharedArray, field: str, shape: tuple[int | None, ...],
           dtype: str | None = None, exact: bool = False) -> np.ndarray:
    """A view of the array `spec` names in `segment`, checked: rank and the given dims of `shape`
    (None: any), dtype `dtype` (exactly, or one that widens to it losslessly unless `exact`), an
    offset aligned to the dtype, and every byte inside the segment."""
    if spec.device_buffer:
        raise InvalidArgument(f"{field}.device_buffer: this array must lie in the segment, not in a GPU buffer")
    sent, wire, offset = checked_span(spec, field, shape, dtype, exact, segment.size, "the segment")
    return np.ndarray(sent, wire, buffer=segment.mapping, offset=offset)


def checked_span(spec: pb.SharedArray, field: str, shape: tuple[int | None, ...], dtype: str | None, exact: bool,
                 size: int, where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset) of `spec` once checked as `region` says, against `size` bytes of `where`."""
    wire = WIRE_DTYPES.get(spec.dtype)
    if wire is None:
        raise InvalidArgument(f"{field}.dtype: {spec.dtype[:32]!r} is not one of {sorted(WIRE_DTYPES)}")
    if dtype is not None and (spec.dtype != dtype if exact else not _widens(spec.dtype, dtype, field)):
        raise InvalidArgument(f"{field}.dtype: expected {dtype!r}, got {spec.dtype!r}")
    sent = tuple(spec.shape)
    if len(sent) != len(shape) or any(want is not None and got != want for got, want in zip(sent, shape, strict=True)):
        expected = "(" + ", ".join("k" if want is None else str(want) for want in shape) + ")"
        raise InvalidArgument(f"{field}.shape: expected {expected}, got {sent[:8]}")
    try:
        nbytes = element_count(sent, field, wire.itemsize) * wire.itemsize
    except WireError as exc:
        raise InvalidArgument(str(exc)) from None
    offset = spec.offset
    if offset % wire.itemsize:
        raise InvalidArgument(f"{field}.offset: {offset} is not a multiple of the {spec.dtype} size "
                              f"({wire.itemsize})")
    if offset > size or nbytes > size - offset:
        raise InvalidArgument(f"{field}: bytes [{offset}, {offset + nbytes}) lie outside {where}'s {size} bytes")
    return sent, wire, offset


def _widens(sent: str, stored: str, field: str) -> bool:
    try:
        check_dtype(sent, stored, field)
    except WireError:
        return False
    return True
