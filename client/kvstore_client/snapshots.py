"""Client methods for snapshots, export and import (mixed into KVStoreClient).

`export`/`import_chunks` are the streaming forms of the Export and Import RPCs;
`export_table`/`import_table` move a whole table as arrays in memory (what a
module's state_dict needs). Transfers get their own, long deadline.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from kvstore_proto.export_format import ExportChunk
from kvstore_proto.tensors import WireError, decode_export_chunk, encode_message, wire_name
from kvstore_proto.v1 import kvstore_pb2 as pb

from .arrays import as_ids, as_rows, chunks, to_numpy
from .errors import InternalError, InvalidArgumentError
from .errors import rpc_errors as _rpc
from .writes import RETRIES, streamed_write

IMPORT_MODES = {"merge": pb.IMPORT_MODE_MERGE, "replace": pb.IMPORT_MODE_REPLACE}
TRANSFER_TIMEOUT = 24 * 3600.0
_NO_IDS = np.zeros(0, np.int64)
_LAST = pb.ImportRequest(last=True).SerializeToString()     # appended to the final request: merged into it




def _one_pass(parts: Iterable) -> bool:
    """True when `parts` can be read only once (a retry could not send it again)."""
    return iter(parts) is parts


def _snapshot_dict(info: pb.SnapshotInfo) -> dict:
    from .client import _to_dict

    return {
        "name": info.name, "created_at": info.created_at, "format_version": info.format_version,
        "tables": [_to_dict(t) for t in info.tables], "rows": dict(info.rows),
        "pause_seconds": info.pause_seconds, "duration_seconds": info.duration_seconds,
    }


class ExportStream:
    """Chunks of one table in key order; `config` and `estimated_rows` are known before the first.
    Responses arrive as bytes and are read in place (tensors.decode_export_chunk)."""

    def __init__(self, responses: Iterator[bytes]):
        self._responses = responses
        with _rpc():
            first = next(responses, None)
        self._head, arrays = decoded(first if first is not None else b"")
        if not self._head.HasField("config"):
            raise InternalError(message="export: the server sent no header chunk")
        from .client import _to_dict

        self.config = _to_dict(self._head.config)
        self.estimated_rows = self._head.estimated_rows
        self._first = _chunk(arrays)
        self.state_dim = self._first.state.shape[1]

    def __iter__(self) -> Iterator[ExportChunk]:
        if len(self._first.ids):
            yield self._first
        with _rpc():
            for response in self._responses:
                yield _chunk(decoded(response)[1])

    def cancel(self) -> None:
        self._responses.cancel()


def decoded(response: bytes) -> tuple[pb.ExportChunk, dict[str, np.ndarray]]:
    """(header fields, row arrays) of one serialized ExportChunk; a malformed one is InternalError."""
    try:
        return decode_export_chunk(response)
    except (WireError, DecodeError) as exc:
        raise InternalError(message=f"export: malformed chunk: {exc}") from None


def _chunk(arrays: dict[str, np.ndarray]) -> ExportChunk:
    ids = arrays.get("ids", _NO_IDS)
    weights, state, meta = (arrays.get(name) for name in ("weights", "state", "meta"))
    if weights is None or state is None or meta is None:
        raise InternalError(message="export: a chunk lacks weights, state or meta")
    if weights.shape[0] != len(ids) or state.shape[0] != len(ids) or meta.shape != (len(ids), 3):
        raise InternalError(message="export: a chunk's tensors disagree with its ids")
    return ExportChunk(ids, weights, state, meta.astype(np.uint32))


class SnapshotMethods:
    def create_snapshot(self, name: str) -> dict:
        """A point-in-time copy of every table on the server; includes `pause_seconds`."""
        with _rpc():
            response = self._stub.CreateSnapshot(pb.CreateSnapshotRequest(name=name), timeout=TRANSFER_TIMEOUT)
        return _snapshot_dict(response.snapshot)

    def list_snapshots(self) -> list[dict]:
        with _rpc():
            response = self._stub.ListSnapshots(pb.ListSnapshotsRequest(), timeout=self.timeout)
        return [_snapshot_dict(s) for s in response.snapshots]

    def delete_snapshot(self, name: str) -> None:
        with _rpc():
            self._stub.DeleteSnapshot(pb.DeleteSnapshotRequest(name=name), timeout=self.timeout)

    def restore_snapshot(self, name: str) -> dict:
        """Make the snapshot the server's live data; the server keeps serving throughout."""
        with _rpc():
            response = self._stub.RestoreSnapshot(pb.RestoreSnapshotRequest(name=name), timeout=TRANSFER_TIMEOUT)
        self._row_shapes.clear()
        out = _snapshot_dict(response.snapshot)
        out["restore_seconds"] = response.duration_seconds
        return out

    # --- export and import ---------------------------------------------------

    def export(self, table: str, chunk_rows: int = 0, timeout: float = TRANSFER_TIMEOUT) -> ExportStream:
        """Stream every row of `table` as it was at this call, in increasing id order."""
        responses = self._export(pb.ExportRequest(table=table, chunk_rows=chunk_rows), timeout=timeout)
        return ExportStream(responses)

    def export_table(self, table: str) -> ExportChunk:
        """The whole table in memory: ids [n], weights [n, dim], state [n, state_dim], meta [n, 3]."""
        stream = self.export(table)
        parts = list(stream)
        if not parts:
            return stream._first
        return ExportChunk(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "weights", "state",
                                                                                       "meta")))

    def import_chunks(self, table: str, parts: Iterable[ExportChunk | tuple], mode: str = "merge",
                      config: dict | None = None, timeout: float = TRANSFER_TIMEOUT) -> int:
        """Stream chunks (ids, weights, state?, meta?) into `table`; applied only once all arrived valid.
        With `config` (a table config dict), a missing table is created from it."""
        if mode not in IMPORT_MODES:
            raise InvalidArgumentError(message=f"mode: unknown import mode {mode!r}; expected one of "
                                               f"{list(IMPORT_MODES)}")
        header = pb.ImportRequest(table=table, mode=IMPORT_MODES[mode])
        if config is not None:
            header.config.CopyFrom(_config_message(config))

        def requests(key: str) -> Iterator[bytes]:
            header.idempotency_key = key
            first = header.SerializeToString()       # the header fields travel with the first rows
            for part in parts:
                for ids, weights, state, meta in self._import_slices(part):
                    yield rows_request(ids, weights, state, meta, first)
                    first = b""
            if first:
                yield first

        return streamed_write(self._import, requests, timeout, retries=0 if _one_pass(parts) else RETRIES,
                              marks=lambda request: request + _LAST).rows

    def _import_slices(self, part) -> Iterator[tuple]:
        """(ids, weights, state, meta) of each import message of one part, about `chunk_bytes` each."""
        if isinstance(part, ExportChunk):
            part = (part.ids, part.weights, part.state, part.meta)
        ids = as_ids(part[0])
        weights = as_rows(part[1], len(ids), "weights")
        state = None if len(part) < 3 or part[2] is None else as_rows(part[2], len(ids), "state")
        meta = None if len(part) < 4 or part[3] is None else as_rows(part[3], len(ids), "meta").astype(np.int64)
        row_bytes = 8 + weights[:1].nbytes + (0 if state is None else state[:1].nbytes) + 24
        for start, stop in chunks(len(ids), row_bytes, self.chunk_bytes):
            yield (ids[start:stop], weights[start:stop], None if state is None else state[start:stop],
                   None if meta is None else meta[start:stop])

    def import_table(self, table: str, ids: Any, weights: Any, state: Any = None, mode: str = "merge",
                     meta: Any = None, config: dict | None = None) -> int:
        """Load whole arrays into `table` (sorted by id first, so the server ingests few files).
        Duplicate ids: the last one wins. Returns the rows imported."""
        id_array = as_ids(ids)
        order = np.argsort(id_array, kind="stable")
        arrays = [id_array, to_numpy(weights, "weights")]
        arrays += [None if a is None else to_numpy(a, name) for a, name in ((state, "state"), (meta, "meta"))]
        if any(a is not None and (a.ndim < 1 or len(a) != len(id_array)) for a in arrays[1:]):
            raise InvalidArgumentError(message=f"weights: every array needs one row per id ({len(id_array)})")
        ordered = tuple(None if a is None else a[order] for a in arrays)
        return self.import_chunks(table, [ordered], mode=mode, config=config)


def rows_request(ids: np.ndarray, weights: np.ndarray, state, meta, prefix: bytes = b"",
                 within: int | None = None) -> bytes:
    """A serialized ImportRequest of rows after the serialized fields `prefix` (within field `within`
    of an outer message: ImportChainRequest), built with one copy of the rows (tensors.encode_message):
    a message built from arrays, then serialized, copies them three times."""
    for array, field in ((weights, "weights"), (state, "state"), (meta, "meta")):
        if array is not None:
            try:
                wire_name(np.asarray(array).dtype, field)
            except WireError as exc:
                raise InvalidArgumentError(message=str(exc)) from None
    return encode_message({5: weights, 6: state, 7: meta}, {4: ids}, prefix, within)


def _config_message(config: dict) -> pb.TableConfig:
    try:
        return pb.TableConfig(**config)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(message=f"config: {exc}") from None
