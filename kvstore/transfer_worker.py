"""The process that does the per-row work of an export or an import, off the server's GIL.

Run by path (`transfer_process._BOOT`), not as part of the package: it imports only
numpy and rocksdict (and the encoder it is told to use), so it starts in a fraction of the
time the store takes to import, and its per-row Python work never holds the server's GIL.

It starts ahead of its job (`transfer_process._Spare`), at a lowered priority (`_BOOT`), and
waits for one JSON line on stdin (the job, see `transfer_process`), then, as frames of
`<c kind><Q rows><Q length>` and `length` bytes:
- task "export": reads one table from a RocksDB checkpoint, in key order, and writes frames
  to stdout: S a chunk (bytes made by the encoder) put in the next slot of the shared memory
  the job names (`Ring`), C a chunk sent in the frame (no ring, or too large for a slot), E an
  error (UTF-8 text), D done. Each byte on stdin frees the oldest slot. Rows the table had not
  yet written to RocksDB at the cut (saved beside the checkpoint as two .npy files) are merged
  in, in key order, the newer one winning.
- task "sst": reads frames from stdin: F path (start an SST file, finishing the one before),
  S rows in the next slot of the shared memory (ids then stored rows, in increasing id order;
  answered with A once the slot is free again), R such rows in the frame, E end (finish the
  last file), and answers the end with D (or E, an error) on stdout.
It exits when stdin reaches end of file (its server is gone, even by kill -9, or gave the work
up) or stdout is closed.
"""
from __future__ import annotations

import collections
import gc
import importlib
import itertools
import json
import mmap
import os
import struct
import sys
import threading
import traceback

import numpy as np
import rocksdict as rd

FRAME = struct.Struct("<cQQ")
KEY_BYTES = 8
_SIGN = np.uint64(1 << 63)


def check_ended(family, options, last: bytes | None, start: bytes | None = None) -> None:
    """Raise the error at which an iteration of `family` stopped after key `last` (None: it
    yielded nothing, from `start`), if it stopped at one. rocksdict's `items()` and `keys()` end
    quietly where RocksDB's iterator fails (a block whose checksum does not match), which would
    read as the end of the table. A second iterator placed just past `last` meets the same block
    and keeps the error in its `status()`, which raises it. (When it finds a key instead, the key
    came after the first iterator began, or past a scan's bound: not an error.)"""
    iterator = family.iter(options)
    if last is not None:
        iterator.seek(last)
        if iterator.valid() and iterator.key() == last:
            iterator.next()
    elif start is not None:
        iterator.seek(start)
    else:
        iterator.seek_to_first()
    if not iterator.valid():
        iterator.status()


def raw_rows(layout: dict, ids: np.ndarray, rows: np.ndarray) -> list:
    """The in-process encoding: ids (int64) then the rows as stored; the store decodes it in place."""
    return [np.ascontiguousarray(ids, "<i8").data, np.ascontiguousarray(rows).data]


def _ids_of(keys: np.ndarray) -> np.ndarray:
    return (keys.view(">u8")[:, 0].astype(np.uint64) ^ _SIGN).view(np.int64)


class CheckpointReader:
    """Chunks of the rows of a checkpoint's column family, merged with the table's unsaved rows."""

    def __init__(self, job: dict):
        self.job = job
        self.row_bytes = int(job["layout"]["row_bytes"])
        self.chunk_rows = int(job["chunk_rows"])
        opts = rd.Options(raw_mode=True)
        self.db = rd.Rdict(job["checkpoint"], opts, column_families={job["family"]: rd.Options(raw_mode=True)},
                           access_type=rd.AccessType.read_only())
        self.unsaved_ids, self.unsaved_rows = self._unsaved()

    def _unsaved(self) -> tuple[np.ndarray, np.ndarray]:
        """The unsaved rows, sorted by id, the newest copy of each id."""
        if not self.job.get("unsaved"):
            return np.zeros(0, np.int64), np.zeros((0, self.row_bytes), np.uint8)
        ids = np.load(self.job["unsaved"] + "-ids.npy", mmap_mode="r")
        rows = np.load(self.job["unsaved"] + "-rows.npy", mmap_mode="r")
        ids = np.asarray(ids)
        newest = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]    # sorted, the last copy wins
        return ids[newest], np.asarray(rows[newest])

    def batches(self):
        """(ids, rows) of stored rows in key order, `chunk_rows` at a time, unsaved rows merged in."""
        opts = rd.ReadOptions()
        opts.fill_cache(False)
        opts.set_readahead_size(2 << 20)
        family = self.db.get_column_family(self.job["family"])
        items = family.items(read_opt=opts)
        width = KEY_BYTES + self.row_bytes
        taken = 0                                   # unsaved rows merged so far
        last_key = None
        while True:
            batch = list(itertools.islice(items, self.chunk_rows))
            flat = np.frombuffer(b"".join(itertools.chain.from_iterable(batch)), np.uint8)
            if flat.size != len(batch) * width:
                raise ValueError(f"stored rows have an unexpected size (expected {self.row_bytes} bytes each)")
            records = flat.reshape(len(batch), width)
            ids = _ids_of(records[:, :KEY_BYTES])
            last = len(batch) < self.chunk_rows
            last_key = batch[-1][0] if batch else last_key
            if last:                                # the end, or a block rocksdict's items() stopped at quietly
                check_ended(family, opts, last_key)
            upto = len(self.unsaved_ids) if last else int(np.searchsorted(self.unsaved_ids, ids[-1], "right"))
            yield from self._merged(ids, records[:, KEY_BYTES:], taken, upto)
            taken = upto
            if last:
                return

    def _merged(self, ids: np.ndarray, rows: np.ndarray, start: int, end: int):
        if end > start:
            ids = np.concatenate([ids, self.unsaved_ids[start:end]])
            rows = np.concatenate([rows, self.unsaved_rows[start:end]])
            order = np.argsort(ids, kind="stable")           # an unsaved copy sorts after the stored one
            ids, rows = ids[order], rows[order]
            newest = np.append(ids[1:] != ids[:-1], True)
            ids, rows = ids[newest], rows[newest]
        for at in range(0, len(ids), self.chunk_rows):
            yield ids[at:at + self.chunk_rows], rows[at:at + self.chunk_rows]

    def close(self) -> None:
        self.db.close()


def _write(out, kind: bytes, rows: int, parts: list) -> None:
    size = sum(memoryview(p).nbytes for p in parts)
    out.write(FRAME.pack(kind, rows, size))
    for part in parts:
        out.write(part)


class SstFiles:
    """The SST files of an import, written as the server sends their rows (`write` runs the frames)."""

    def __init__(self, job: dict, out):
        self.row_bytes = int(job["row_bytes"])
        self.options = rd.Options(raw_mode=True)
        table = rd.BlockBasedOptions()                # as the database's own files (RocksTier._options)
        table.set_bloom_filter(int(job["bloom_bits"]), False)
        table.set_cache_index_and_filter_blocks(True)
        self.options.set_block_based_table_factory(table)
        self.options.set_compression_type(getattr(rd.DBCompressionType, job["compression"])())
        self.writer, self.path, self.rows = None, "", 0
        self.ring, self.out = (Ring(job["ring"]) if job.get("ring") else None), out

    def write(self, src) -> None:
        while True:
            kind, rows, size = FRAME.unpack(_read_exactly(src, FRAME.size))
            if kind == b"S":                  # rows in the next slot of the shared memory
                at = (self.ring.next % self.ring.slots) * self.ring.slot_bytes
                items = self._items(self.ring.memory, rows, at)
                self.ring.next += 1
                _write(self.out, b"A", 0, [])         # the slot is free again: the rows are copied out
                self.out.flush()
                self._add(*items)
                continue
            payload = _read_exactly(src, size)
            if kind == b"R":
                self._add(*self._items(payload, rows))
                continue
            self._finish()
            if kind != b"F":
                return
            self.path, self.rows = payload.decode(), 0
            self.writer = rd.SstFileWriter(self.options)
            self.writer.open(self.path)

    def _items(self, buffer, n: int, at: int = 0) -> tuple[list, list]:
        """Keys and values of `n` rows lying in `buffer` from `at`: ids (int64), then stored rows."""
        ids = np.frombuffer(buffer, np.int64, n, at)
        rows = np.frombuffer(buffer, np.uint8, n * self.row_bytes, at + n * KEY_BYTES)
        keys = ((ids.view(np.uint64) ^ _SIGN).astype(">u8")).view("V8").tolist()   # as kvstore.rows.encode_keys
        return keys, rows.view(f"V{self.row_bytes}").tolist()

    def _add(self, keys: list, values: list) -> None:
        collections.deque(map(self.writer.__setitem__, keys, values), maxlen=0)
        self.rows += len(keys)

    def _finish(self) -> None:
        if self.writer is not None and self.rows:
            self.writer.finish()
        self.writer = None


def _read_exactly(src, size: int) -> bytes:
    data = src.read(size) if size else b""
    if len(data) != size:            # the server is gone or gave the import up: nothing to finish
        os._exit(0)
    return data


class Ring:
    """The shared memory an export's chunks go through: slots filled in turn, each filled again
    only after the server said (a byte on stdin) it read what the slot held."""

    def __init__(self, spec: dict):
        self.slots, self.slot_bytes = int(spec["slots"]), int(spec["slot_bytes"])
        self.memory = mmap.mmap(int(spec["fd"]), self.slots * self.slot_bytes)
        self.free = threading.Semaphore(self.slots)
        self.next = 0

    def put(self, parts: list) -> int | None:
        """Bytes of `parts` copied into the next slot once it is free; None when they do not fit."""
        size = sum(memoryview(p).nbytes for p in parts)
        if size > self.slot_bytes:
            return None
        self.free.acquire()
        at = (self.next % self.slots) * self.slot_bytes
        for part in parts:
            part = memoryview(part).cast("B")
            self.memory[at:at + part.nbytes] = part
            at += part.nbytes
        self.next += 1
        return size


def export_checkpoint(job: dict, out) -> None:
    module, _, name = job.get("encoder", "").rpartition(":")
    encode = getattr(importlib.import_module(module), name) if module else raw_rows
    ring = Ring(job["ring"]) if job.get("ring") else None
    threading.Thread(target=_read_answers, args=(ring,), daemon=True).start()
    reader = CheckpointReader(job)
    try:
        for ids, rows in reader.batches():
            encoded = encode(job["layout"], ids, rows)
            parts = encoded if isinstance(encoded, list) else [encoded]
            size = ring.put(parts) if ring is not None else None
            if size is None:
                _write(out, b"C", len(ids), parts)
            else:
                out.write(FRAME.pack(b"S", len(ids), size))
                out.flush()
    finally:
        reader.close()


def _read_answers(ring: Ring | None) -> None:
    """Each byte the server sends frees a slot; end of file means it is gone (or wants no more)."""
    while answers := sys.stdin.buffer.read1(1 << 16):
        for _ in range(len(answers) if ring is not None else 0):
            ring.free.release()
    os._exit(0)


def main() -> int:
    out, src = sys.stdout.buffer, sys.stdin.buffer
    gc.disable()            # one short job, no reference cycles: collections would only rescan its row tuples
    line = src.readline()
    if not line:            # the server is gone before it had a job for this (waiting) worker
        return 0
    job = json.loads(line)
    try:
        if job["task"] == "sst":
            SstFiles(job, out).write(src)
        else:
            export_checkpoint(job, out)
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the server, which raises it as a StorageError
        traceback.print_exc(file=sys.stderr)
        _write(out, b"E", 0, [f"{type(exc).__name__}: {exc}".encode()])
    else:
        _write(out, b"D", 0, [])
    out.flush()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except BrokenPipeError:          # the server closed our stdout: it wants no more
        code = 0
    os._exit(code)                   # not sys.exit: interpreter shutdown would wait on the stdin reader
