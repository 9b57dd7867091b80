"""Export files written past the page cache (O_DIRECT), checksummed (CRC-32) as their bytes pass.

Why: copying an export into fresh page-cache pages is the largest CPU cost of `kvstore export`
on a VM (0.1-0.9 s of kernel time per 500 MiB, measured in docs/benchmarks.md), while a direct
write from one reused, page-aligned buffer costs almost none; and an export, rarely read back
soon, then does not push a server's working set out of the page cache. Where a file system
refuses O_DIRECT (tmpfs, some network file systems; macOS has no such flag) the same bytes go
through the page cache. Either way the file holds exactly the bytes written.
"""
from __future__ import annotations

import errno
import fcntl
import io
import mmap
import os
import zlib

import numpy as np

ALIGN = 4096                 # a multiple of every logical block size O_DIRECT asks alignment to
BUFFER_BYTES = 4 << 20       # the staging buffer: large writes, small enough to stay warm in memory
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class StagingBuffer:
    """A page-aligned buffer reused by every file of one export (fresh memory costs a VM dearly)."""

    def __init__(self, size: int | None = None):
        self.mapping = mmap.mmap(-1, size or BUFFER_BYTES)
        self.array = np.frombuffer(self.mapping, np.uint8)

    def close(self) -> None:
        self.array = None
        self.mapping.close()


class HashedFile(io.RawIOBase):
    """A new write-only file that checksums (CRC-32) what is written. It says it cannot seek, so
    zipfile writes each member's sizes after its data (standard zip data descriptors)."""

    def __init__(self, path: str, buffer: StagingBuffer):
        self.crc, self.written = 0, 0
        self._buffer, self._fill = buffer.array, 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd = os.open(path, flags | _O_DIRECT, 0o666)
            self._direct = bool(_O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fd, self._direct = os.open(path, flags, 0o666), False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.written

    @property
    def checksum(self) -> str:
        """The CRC-32 of the bytes written, as 8 hex digits (the manifest's `crc32`)."""
        return f"{self.crc:08x}"

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        self.crc = zlib.crc32(view, self.crc)
        if not self._direct:
            self._write_all(view)
        elif size:
            source, at, room = np.frombuffer(view, np.uint8), 0, len(self._buffer)
            while at < size:
                take = min(size - at, room - self._fill)
                self._buffer[self._fill:self._fill + take] = source[at:at + take]   # numpy copies without the GIL
                self._fill += take
                at += take
                if self._fill == room:
                    self._drain(room)
        self.written += size
        return size

    def _drain(self, size: int) -> None:
        """Write the buffer's first `size` bytes (a multiple of ALIGN); without O_DIRECT if refused."""
        view = memoryview(self._buffer)[:size]
        while view.nbytes:
            try:
                view = view[os.write(self._fd, view):]
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._direct:
                    raise
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
                self._direct = False
        self._fill = 0

    def _write_all(self, view: memoryview) -> None:
        while view.nbytes:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._fill:                    # the tail, padded to a whole block, then cut back
                tail = self._fill
                padded = -(-tail // ALIGN) * ALIGN
                self._buffer[tail:padded] = 0
                self._drain(padded)
                os.ftruncate(self._fd, self.written)
        finally:
            os.close(self._fd)
            super().close()
