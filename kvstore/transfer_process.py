"""Worker processes for exports and imports (`transfer_worker.py`): the per-row work off the GIL.

Iterating RocksDB makes Python objects per row and holds the GIL for hundreds of microseconds
at a time, which stalls every other call of the server (lookups of other tables). So an export
is cut like a snapshot (`Table.export_cut`: in one hold of the table's lock, a copy of the rows
RocksDB lacks and a RocksDB checkpoint, hard links to the SST files), the copied rows are saved
beside the checkpoint, and a worker process (`transfer_worker.py`) reads the checkpoint in key
order, merges the saved rows in and writes ready-made chunks (bytes from an encoder it imports
by name) to a pipe. Nothing is flushed or written to the live database.

Everything lives in one directory under the store's staging directory, removed on `close`
(the store removes leftovers of a killed server when it opens). A worker exits when its stdin
reaches end of file, so it never outlives its server, even one killed with SIGKILL.

An export's chunks, and an import's rows the other way, pass through memory the worker shares
with the server (a memfd it inherits, `RING_SLOTS` slots written in turn, each freed by an
answer from the reading side), not through the pipe: a copy into and one out of the kernel
less per chunk, and no pipe locking (which cost an import 0.3-0.5 s of CPU per 500 MiB);
the pipes carry the frames that say where each chunk lies (and a chunk too large for a slot,
or every chunk where memfds do not exist).

Starting a worker (an interpreter, numpy, rocksdict) costs about 0.25 s of CPU, a tenth of
what a 500 MiB export costs in all on two cores; so one started worker is kept waiting for
its job (`_Spare`), and a transfer takes it and starts the next one, which gets ready at the
worker's low priority while the transfer runs. The waiting worker holds nothing but its pipes.

Imports send their validated rows to a worker process (`SstWorker`) that writes the SST files
the table then ingests: turning each row into a key and a value object for the SST writer is
the per-row part of an import.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np

from .config import RocksConfig
from .errors import FailedPrecondition, StorageError, Unavailable
from .rows import HEADER, RowLayout

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_worker.py")
FRAME = struct.Struct("<cQQ")            # as transfer_worker.FRAME: kind, rows, payload bytes
PIPE_BYTES = 1 << 20                     # pipe buffer asked for (Linux allows up to 1 MiB unprivileged)
RING_SLOTS = 4                           # chunks one side may be ahead of the other in shared memory
SST_SLOT_BYTES = 4 << 20                 # a slot of an import's rows (a larger chunk takes several)
MAX_SLOT_BYTES = 64 << 20                # an export's slots at most (the ring holds RING_SLOTS of them)
KEY_BYTES = 8
_F_SETPIPE_SZ = 1031
NICENESS = 10                            # bulk work: where cores are scarce, the server's own calls go first
# Runs the worker script at NICENESS (its imports too) without putting its directory (this package's, whose
# module names could shadow others) or the working directory on the path (`python -P` does that from 3.11 only).
_BOOT = (f"import os; os.nice({NICENESS}); import runpy, sys; sys.path[:] = [p for p in sys.path if p]; "
         "runpy.run_path(sys.argv[1], run_name='__main__')")
_META_OFFSET = HEADER.fields["count"][1]
# glibc malloc in a worker keeps freed buffers (a chunk's rows) for the next chunk instead of
# returning them and faulting fresh pages in again, as the server's own (`kvstore_server.allocator`)
_REUSE_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def layout_fields(layout: RowLayout, dtype: str) -> dict:
    """Where each column lies in a stored row, for the worker's encoder (which never imports the store)."""
    return {"row_bytes": layout.row_bytes, "dim": layout.dim, "dtype": dtype, "weight_offset": layout.weight_offset,
            "itemsize": layout.dtype.itemsize, "state_dim": layout.state_dim, "state_offset": layout.state_offset,
            "meta_offset": _META_OFFSET}


class ExportCut:
    """A table frozen at one instant in `directory`: a checkpoint of the database and the table's
    unsaved rows (`unsaved`-ids.npy / -rows.npy). The table's calls wait only for the copy and the
    checkpoint (memtables are flushed before, with the GIL released, so it has little to flush)."""

    def __init__(self, directory: str, table):
        self.directory = directory
        self.checkpoint = os.path.join(directory, "db")
        self.family = table.family
        self.unsaved: str | None = None
        try:
            os.makedirs(directory)
            table.rocks.flush()
            ids, rows, self.sequence = table.export_cut(lambda: table.rocks.checkpoint(self.checkpoint))
            if len(ids):
                self.unsaved = os.path.join(directory, "unsaved")
                np.save(self.unsaved + "-ids.npy", ids)
                np.save(self.unsaved + "-rows.npy", rows)
        except (OSError, StorageError) as exc:     # a full or failing disk under the staging directory
            self.remove()
            raise FailedPrecondition(f"table: cannot prepare the export of {table.name!r} in the staging "
                                     f"directory: {exc}") from None
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class WorkerStream:
    """The chunks of an export as (rows, bytes), read in key order from a worker process. `close`
    ends the worker and removes the cut."""

    def __init__(self, cut: ExportCut, layout: dict, chunk_rows: int, encoder: str = ""):
        self.cut = cut
        self._worker: _WorkerProcess | None = None
        self._slot = 0                       # the ring slot the next chunk in shared memory lies in
        # a chunk's message: its rows (meta as int64) and the message's own fields; chunks larger
        # than MAX_SLOT_BYTES (only in process: the service's messages are smaller) take the pipe
        slot_bytes = -(-(chunk_rows * (8 + int(layout["row_bytes"]) + 24) + 4096) // mmap.PAGESIZE) * mmap.PAGESIZE
        slot_bytes = slot_bytes if slot_bytes <= MAX_SLOT_BYTES else 0
        try:
            self._worker = _start_worker({"task": "export", "checkpoint": cut.checkpoint, "family": cut.family,
                                          "unsaved": cut.unsaved, "layout": layout, "chunk_rows": chunk_rows,
                                          "encoder": encoder}, slot_bytes)
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        worker = self._worker
        while True:
            kind, rows, size = FRAME.unpack(_read(worker, FRAME.size))
            if kind == b"S":                 # the chunk lies in the next slot of the shared memory
                at = (self._slot % RING_SLOTS) * worker.slot_bytes
                payload = worker.ring[at:at + size]
                self._slot += 1
                _free_slot(worker)
                yield rows, payload
                continue
            payload = _read(worker, size)
            if kind == b"C":
                yield rows, payload
            elif kind == b"E":
                raise StorageError(f"export: reading the checkpoint failed: {payload.decode(errors='replace')}")
            else:
                return

    def close(self) -> None:
        if self._worker is not None:
            _stop(self._worker)
            self._worker = None
        self.cut.remove()


class SstWorker:
    """Writes an import's SST files in a worker process: `open` a file, `put` sorted rows into it,
    `finish` (every file complete, or the worker's error raised). `close` stops the worker. Rows
    go through the worker's shared memory, a slot at a time, where it has one."""

    def __init__(self, row_bytes: int, rocks: RocksConfig):
        self.row_bytes = row_bytes
        self._worker = _start_worker({"task": "sst", "row_bytes": row_bytes, "bloom_bits": rocks.bloom_bits_per_key,
                                      "compression": rocks.compression}, SST_SLOT_BYTES)
        self._ring = None if self._worker.ring is None else np.frombuffer(self._worker.ring, np.uint8)
        self._slot, self._in_flight = 0, 0       # slots used so far; those the worker has not freed yet

    def open(self, path: str) -> None:
        self._send(b"F", 0, [path.encode()])

    def put(self, ids: np.ndarray, rows: np.ndarray) -> None:
        ids, rows = np.ascontiguousarray(ids, "<i8"), np.ascontiguousarray(rows)
        if self._ring is None:
            self._send(b"R", len(ids), [ids.data, rows.data])
            return
        slot_rows = self._worker.slot_bytes // (KEY_BYTES + self.row_bytes)
        for start in range(0, len(ids), slot_rows):
            part_ids, part_rows = ids[start:start + slot_rows], rows[start:start + slot_rows]
            while self._in_flight == RING_SLOTS:
                self._answer()
            at, n = (self._slot % RING_SLOTS) * self._worker.slot_bytes, len(part_ids)
            self._ring[at:at + n * KEY_BYTES] = part_ids.view(np.uint8)
            self._ring[at + n * KEY_BYTES:at + n * (KEY_BYTES + self.row_bytes)] = part_rows.reshape(-1)
            self._slot, self._in_flight = self._slot + 1, self._in_flight + 1
            self._send(b"S", n, [])

    def finish(self) -> None:
        self._send(b"E", 0, [])
        while self._answer() != b"D":
            pass

    def _send(self, kind: bytes, rows: int, parts: list) -> None:
        try:
            pipe = self._worker.stdin
            pipe.write(FRAME.pack(kind, rows, sum(memoryview(p).nbytes for p in parts)))
            for part in parts:
                pipe.write(part)
            pipe.flush()
        except BrokenPipeError:
            while self._answer() == b"A":      # the worker's error, if it said one
                pass
            raise Unavailable("import: the worker process writing its files ended early; nothing changed, "
                              "the import may be retried") from None

    def _answer(self) -> bytes:
        """The worker's next answer: A (a slot freed) or D (done); E (its error) is raised."""
        kind, _, size = FRAME.unpack(_read(self._worker, FRAME.size))
        payload = _read(self._worker, size)
        if kind == b"E":
            raise StorageError(f"import: writing SST files failed: {payload.decode(errors='replace')}")
        if kind == b"A":
            self._in_flight -= 1
        return kind

    def close(self) -> None:
        self._ring = None
        _stop(self._worker)


def _stop(worker: _WorkerProcess) -> None:
    if worker.poll() is None:
        worker.kill()
    worker.wait()
    for pipe in (worker.stdin, worker.stdout):
        try:
            pipe.close()
        except OSError:
            pass
    worker.release_ring()


def _free_slot(worker: _WorkerProcess) -> None:
    """Tell the worker the slot it filled was read (a gone worker: the next read says so)."""
    try:
        worker.stdin.write(b"a")
        worker.stdin.flush()
    except (BrokenPipeError, ValueError):
        pass


class _WorkerProcess(subprocess.Popen):
    """A worker process and the memfd it inherits (-1 where there is none), mapped as `ring`
    once a job asks for slots of `slot_bytes`."""

    ring_fd = -1
    ring: mmap.mmap | None = None
    slot_bytes = 0

    def map_ring(self, slot_bytes: int) -> dict | None:
        """Size and map the shared memory for RING_SLOTS slots; its description for the job."""
        if self.ring_fd < 0 or not slot_bytes:
            return None
        try:
            os.ftruncate(self.ring_fd, RING_SLOTS * slot_bytes)
            self.ring, self.slot_bytes = mmap.mmap(self.ring_fd, RING_SLOTS * slot_bytes), slot_bytes
        except OSError:                       # no memory for it now: the chunks go through the pipe
            return None
        return {"fd": self.ring_fd, "slots": RING_SLOTS, "slot_bytes": slot_bytes}

    def release_ring(self) -> None:
        if self.ring is not None:
            try:
                self.ring.close()
            except BufferError:               # an array still views it: the mapping goes with the array
                pass
            self.ring = None
        if self.ring_fd >= 0:
            os.close(self.ring_fd)
            self.ring_fd = -1


class _Spare:
    """The one started worker waiting for a job (see the module docstring); killed at exit."""

    def __init__(self):
        self._lock = threading.Lock()
        self._worker: _WorkerProcess | None = None
        atexit.register(self.stop)

    def take(self) -> _WorkerProcess:
        """A started worker (the waiting one if it is still alive); another one is started to wait."""
        with self._lock:
            worker, self._worker = self._worker, None
            if worker is not None and worker.poll() is not None:
                _stop(worker)
                worker = None
            if worker is None:
                worker = _spawn()
            try:
                self._worker = _spawn()
            except StorageError:
                self._worker = None          # no spare this time: the next transfer starts its own
            return worker

    def stop(self) -> None:
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            _stop(worker)


def _spawn() -> _WorkerProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),   # the encoder's package too
           "OPENBLAS_NUM_THREADS": "1",        # no BLAS in a worker: no idle BLAS threads spinning at its start
           **_REUSE_FREED_MEMORY}
    try:
        ring_fd = os.memfd_create("kvstore-transfer", os.MFD_CLOEXEC)
    except (AttributeError, OSError):         # not Linux: chunks go through the pipe
        ring_fd = -1
    try:
        worker = _WorkerProcess([sys.executable, "-c", _BOOT, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env=env, close_fds=True, pass_fds=(ring_fd,) if ring_fd >= 0 else ())
    except OSError as exc:
        if ring_fd >= 0:
            os.close(ring_fd)
        raise StorageError(f"export: cannot start a worker process: {exc}") from None
    worker.ring_fd = ring_fd
    for pipe in (worker.stdout, worker.stdin):     # chunks one way, an import's rows the other
        try:
            fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass                              # a smaller pipe only means more reads and writes
    return worker


_SPARE = _Spare()


def _start_worker(job: dict, slot_bytes: int = 0) -> _WorkerProcess:
    """A started worker given `job`; with `slot_bytes`, chunks come back through shared memory."""
    worker = _SPARE.take()
    try:
        job = {**job, "ring": worker.map_ring(slot_bytes)}
        worker.stdin.write(json.dumps(job).encode() + b"\n")
        worker.stdin.flush()                  # stdin stays open: the worker exits when it closes
    except BrokenPipeError:
        _stop(worker)
        raise Unavailable("the worker process of an export or import ended before its start; nothing changed, "
                          "it may be retried") from None
    except BaseException:
        _stop(worker)
        raise
    return worker


def _read(worker: _WorkerProcess, size: int) -> bytes:
    """`size` bytes from the worker (read straight into one bytes object, the GIL released while waiting)."""
    data = worker.stdout.read(size) if size else b""
    if len(data) != size:
        raise Unavailable(f"the worker process of an export or import ended early (exit code {worker.wait()}); "
                          "nothing changed, it may be retried")
    return data
