"""Export chunks as `ExportChunk` bytes, made where the rows are read.

Imported by the server and, by name, by the export's worker process (`kvstore/transfer_worker.py`),
which encodes the rows it reads from the checkpoint so the server only forwards bytes: this
module needs numpy and the wire codec only, never the store or gRPC.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from kvstore_proto.tensors import WIRE_DTYPES, encode_message, message_parts

ENCODER = f"{__name__}:encode_stored_rows"     # the name the worker imports it by


def encode_export_chunk(chunk, header: bytes = b"", tombstones: np.ndarray | None = None) -> bytes:
    """A serialized `ExportChunk` of a chunk of rows (and a delta's tombstones), with `header` (the
    serialized header fields of the first chunk) in front: one copy of the rows (the method is
    pre-serialized, server.PRESERIALIZED)."""
    return encode_message(*_chunk_fields(chunk, tombstones), header)


def encode_stored_rows(layout: dict, ids: np.ndarray, rows: np.ndarray) -> list:
    """The `ExportChunk` of stored rows ([n, row_bytes] uint8 as in RocksDB), `layout` as
    `kvstore.transfer_process.layout_fields` describes it, as parts for the worker to write one
    after the other (no copy into one buffer)."""
    weights_at, state_at, meta_at = layout["weight_offset"], layout["state_offset"], layout["meta_offset"]
    weights = rows[:, weights_at:weights_at + layout["dim"] * layout["itemsize"]].view(WIRE_DTYPES[layout["dtype"]])
    state = rows[:, state_at:state_at + layout["state_dim"] * 4].view("<f4")
    meta = rows[:, meta_at:meta_at + 12].view("<u4")
    return message_parts(*_chunk_fields(SimpleNamespace(ids=ids, weights=weights, state=state, meta=meta)))


def _chunk_fields(chunk, tombstones: np.ndarray | None = None) -> tuple[dict, dict]:
    tensors = {4: chunk.weights, 5: chunk.state, 6: chunk.meta.astype(np.int64)}
    packed = {3: chunk.ids} if tombstones is None else {3: chunk.ids, 62: tombstones}
    return tensors, packed
