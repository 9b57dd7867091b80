"""Export and import of whole tables as chunks of rows, in key order.

An export reads a RocksDB checkpoint cut at one instant together with the rows the table had not
written yet (`transfer_process`), in a worker process, so writes made while the export streams do
not tear it and the export holds no lock or GIL of the server while it reads. An import stages
every chunk into SST files, validating each as it arrives, and changes the table only at `commit`: one
atomic ingest (after dropping every row, in `replace` mode), so a bad chunk
anywhere in the stream changes nothing. What an import keeps in memory besides
its current chunk is its first rows until it knows who writes its files (at most WORKER_BYTES),
the list of its SST files and the id ranges they cover.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgument
from .id_ranges import MAX_RANGES, coalesce
from .rows import HEADER, RowLayout, encode_keys
from .table import Table
from .transfer_process import ExportCut, SstWorker, WorkerStream, layout_fields
from .validation import sorted_distinct

IMPORT_MODES = ("replace", "merge")
META_FIELDS = ("count", "last_access", "step")    # row header fields carried by export/import
KEY_BYTES = 8
_META_START = HEADER.fields[META_FIELDS[0]][1]
if [HEADER.fields[f][1] for f in META_FIELDS] != [_META_START + 4 * i for i in range(len(META_FIELDS))]:
    raise ImportError("kvstore.rows.HEADER: the exported fields must be consecutive uint32s")
SST_ROWS = 1 << 20                                 # rows per staged SST file at most
WORKER_ROWS = 1 << 16      # an import past this many rows (or WORKER_BYTES of them) writes its SST files in a
WORKER_BYTES = 32 << 20    # worker process; until then its rows wait in memory


@dataclass
class RowChunk:
    ids: np.ndarray                  # [n] int64, increasing within an export chunk
    weights: np.ndarray              # [n, dim] in the table dtype
    state: np.ndarray                # [n, state_dim] float32
    meta: np.ndarray                 # [n, 3] uint32: count, last_access, step

    def __len__(self) -> int:
        return len(self.ids)


def rows_to_chunk(layout: RowLayout, ids: np.ndarray, rows: np.ndarray, contiguous: bool = True) -> RowChunk:
    """The columns of stored `rows`; not `contiguous`: weights and state are strided views of
    `rows` (an export copies them once, straight into its messages or files)."""
    meta = rows[:, _META_START:_META_START + 4 * len(META_FIELDS)].view("<u4")   # the fields lie side by side
    weights, state = layout.weights(rows), layout.state(rows)
    if contiguous:
        meta, weights, state = (np.ascontiguousarray(a) for a in (meta, weights, state))
    return RowChunk(ids, weights, state, meta)


def default_chunk_rows(layout: RowLayout, target_bytes: int = 2 << 20) -> int:
    """Rows per chunk so that one chunk is about `target_bytes` (gRPC streams best at 1-4 MiB)."""
    return max(1, target_bytes // layout.row_bytes)


class TableExport:
    """Rows of one table at one instant, read by a worker process from a checkpoint
    (`transfer_process`): `messages()` gives the chunks as the bytes `encoder` (a "module:function"
    the worker imports, see `transfer_worker.raw_rows`) made; iterating gives `RowChunk`s
    (weights and state are read-only strided views of the rows read). Call `close` when done."""

    def __init__(self, table: Table, staging_dir: str, chunk_rows: int | None = None,
                 on_close: Callable[[], None] | None = None, encoder: str = ""):
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                       or chunk_rows < 1):
            raise InvalidArgument(f"chunk_rows: must be a positive integer, got {chunk_rows!r}")
        self.table = table
        self.config = table.config
        self.layout = table.layout
        self.chunk_rows = chunk_rows or default_chunk_rows(table.layout)
        self._on_close = on_close
        self.estimated_rows = table.rocks.estimate_rows(table.family)
        self.rows = 0
        cut = ExportCut(staging_dir, table)           # each part removes what it made if it fails
        self.sequence = cut.sequence                  # the change feed's, for deltas
        self._stream = WorkerStream(cut, layout_fields(self.layout, self.config.dtype), self.chunk_rows, encoder)

    def messages(self) -> Iterator[bytes]:
        """The encoded chunks, in key order."""
        try:
            for rows, payload in self._stream:
                self.rows += rows
                self.table.add_counters({"rows_exported": rows})
                yield payload
        finally:
            self.close()

    def __iter__(self) -> Iterator[RowChunk]:
        width = KEY_BYTES + self.layout.row_bytes
        for payload in self.messages():
            n = len(payload) // width
            ids = np.frombuffer(payload, np.int64, n)
            rows = np.frombuffer(payload, np.uint8, n * self.layout.row_bytes, n * KEY_BYTES)
            yield rows_to_chunk(self.layout, ids, rows.reshape(n, self.layout.row_bytes), contiguous=False)

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


class ImportStager:
    """Validates chunks and stages them as SST files; `commit` applies them in one ingest.

    The first rows wait in memory (up to WORKER_ROWS rows or WORKER_BYTES bytes): an import that
    ends there writes its one file here at `commit`; one that goes past hands them, and every
    later chunk, to a worker process (`SstWorker`), which writes the files while this process
    receives and checks the next chunks, never holding the GIL for a row's key and value."""

    def __init__(self, table: Table, staging_dir: str, mode: str = "merge",
                 clock: Callable[[], float] = time.time):
        if mode not in IMPORT_MODES:
            raise InvalidArgument(f"mode: unknown import mode {mode!r}; expected one of {list(IMPORT_MODES)}")
        self.table = table
        self.layout = table.layout
        self.mode = mode
        self.clock = clock
        self.dir = staging_dir
        os.makedirs(staging_dir, exist_ok=True)
        self.files: list[str] = []
        self._waiting: list[tuple[np.ndarray, np.ndarray]] | None = []   # rows not yet given to a writer
        self._waiting_bytes = 0
        self._writer = None                   # the current file's: an SstFileWriter, or the worker's
        self._worker: SstWorker | None = None
        self._writer_rows = 0
        self._last_id: int | None = None
        self._ranges: list[list[int]] = []    # [first, last] id of each ascending run: for the change feed
        self.rows = 0
        self.created = False        # the import created the table (dropped again on abort)

    def add(self, ids, weights, state=None, meta=None) -> int:
        """Validate one chunk and stage it; nothing in the table changes until `commit`."""
        ids, rows = self._encode(ids, weights, state, meta)
        if not len(ids):
            return 0
        if not sorted_distinct(ids):
            keep = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]   # last write wins, sorted
            # rows are padded to 16 bytes: gathering them as uint64 is ~10x faster than as uint8
            ids, rows = ids[keep], rows.view(np.uint64)[keep].view(np.uint8)
        if self._ranges and ids[0] > self._ranges[-1][1]:
            self._ranges[-1][1] = int(ids[-1])       # the run goes on: one range, whatever its rows
        else:
            self._ranges.append([int(ids[0]), int(ids[-1])])
            if len(self._ranges) > MAX_RANGES:         # keep memory flat: merge overlapping runs now
                self._ranges = coalesce(self._ranges).tolist()
        self.rows += len(ids)
        if self._waiting is None:
            self._write(ids, rows)
            return len(ids)
        self._waiting.append((np.array(ids), rows))    # ids may view the request: keep a copy
        self._waiting_bytes += rows.nbytes
        if self.rows > WORKER_ROWS or self._waiting_bytes > WORKER_BYTES:
            self._worker = SstWorker(self.layout.row_bytes, self.table.rocks.config)
            self._write_waiting()
        return len(ids)

    def _write_waiting(self) -> None:
        waiting, self._waiting, self._waiting_bytes = self._waiting or [], None, 0
        for ids, rows in waiting:
            self._write(ids, rows)

    def _write(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Add sorted rows to the current file, or to a new one (SST keys must increase: a chunk
        overlapping the one before starts a file; so does a full file)."""
        if self._writer is None or self._last_id is None or ids[0] <= self._last_id \
                or self._writer_rows + len(ids) > SST_ROWS:
            self._next_file()
        if self._worker is not None:
            self._worker.put(ids, rows)
        else:
            self.table.rocks.put_sst(self._writer, encode_keys(ids), self.layout.to_values(rows))
        self._writer_rows += len(ids)
        self._last_id = int(ids[-1])

    def _encode(self, ids, weights, state, meta) -> tuple[np.ndarray, np.ndarray]:
        layout = self.layout
        ids, weights, state = self.table.check_rows(ids, weights, state)
        n = len(ids)
        rows = layout.empty(n)
        layout.weights(rows)[:] = weights
        if state is not None:
            layout.state(rows)[:] = state
        header = layout.header(rows)
        if meta is None:
            header["last_access"] = int(self.clock())
        else:
            meta = np.asarray(meta)
            if meta.shape != (n, len(META_FIELDS)) or meta.dtype.kind not in "iu":
                raise InvalidArgument(
                    f"meta: expected integers of shape ({n}, {len(META_FIELDS)}), got {meta.dtype} {meta.shape}")
            if n and (meta.min() < 0 or meta.max() > np.iinfo(np.uint32).max):
                raise InvalidArgument("meta: values must fit in uint32")
            for i, name in enumerate(META_FIELDS):
                header[name] = meta[:, i]
        return ids, rows

    def _next_file(self) -> None:
        """Finish the current file and start the next (the worker finishes its own when told of
        the next, or at the end)."""
        if self._writer is not None and self._worker is None:
            self._writer.finish()
        path = os.path.join(self.dir, f"{len(self.files):06d}.sst")
        if self._worker is not None:
            self._worker.open(path)
            self._writer = self._worker
        else:
            self._writer = self.table.rocks.sst_writer(path)
        self.files.append(path)
        self._writer_rows = 0

    def commit(self) -> int:
        """Apply the staged rows: one atomic ingest by the table, which drops its cached copies of
        the imported id ranges and records the ranges in the change feed. Returns rows."""
        try:
            self._write_waiting()
            if self._worker is None and self._writer is not None:
                self._writer.finish()
            elif self._worker is not None:
                self._worker.finish()             # every file it wrote is complete
            distinct = len(self._ranges) <= 1        # one ascending run of chunks: no id came twice
            self.table.ingest(self.files, self.mode == "replace", self.rows, coalesce(self._ranges), distinct)
        finally:
            self.abort()
        return self.rows

    def abort(self) -> None:
        """Drop whatever was staged; the table is unchanged."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()
        self._writer, self._waiting = None, None
        self.files = []
        self._ranges = []
        shutil.rmtree(self.dir, ignore_errors=True)
