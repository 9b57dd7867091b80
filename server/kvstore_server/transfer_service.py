"""Snapshot, export and import RPCs: a mixin of the servicer, thin like the rest.

Export streams chunks read from a consistent view of the table; an error
raised mid-stream still reaches the client with its code (the `streaming`
wrapper). Import stages every chunk on the server's disk and applies them only
after the last one arrived and passed validation, so a bad chunk, a cancelled
call or a dropped connection changes nothing.
"""
from __future__ import annotations

import numpy as np
from kvstore_proto.tensors import decode_ids, decode_tensor, encode_ids, encode_tensor
from kvstore_proto.v1 import kvstore_pb2 as pb

from kvstore import Store, TableConfig
from kvstore.dtypes import weight_dtype
from kvstore.errors import InvalidArgument
from kvstore.snapshots import SnapshotInfo

from .messages import table_config_from_proto, table_config_to_proto
from .rpc import check_active, streaming, unary

IMPORT_MODES = {
    pb.IMPORT_MODE_UNSPECIFIED: "merge",
    pb.IMPORT_MODE_MERGE: "merge",
    pb.IMPORT_MODE_REPLACE: "replace",
}
CHUNK_OVERHEAD = 4096     # framing and the header fields of one export chunk


def snapshot_to_proto(info: SnapshotInfo) -> pb.SnapshotInfo:
    return pb.SnapshotInfo(
        name=info.name, created_at=info.created_at, rows=info.rows, format_version=info.format_version,
        tables=[table_config_to_proto(TableConfig.from_dict(c)) for c in info.tables.values()],
        pause_seconds=info.pause_seconds, duration_seconds=info.duration_seconds,
    )


class SnapshotRPCs:
    """CreateSnapshot, ListSnapshots, DeleteSnapshot, RestoreSnapshot, Export, Import."""

    store: Store

    @unary
    def CreateSnapshot(self, request, context):
        return pb.CreateSnapshotResponse(snapshot=snapshot_to_proto(self.store.create_snapshot(request.name)))

    @unary
    def ListSnapshots(self, request, context):
        return pb.ListSnapshotsResponse(snapshots=[snapshot_to_proto(s) for s in self.store.list_snapshots()])

    @unary
    def DeleteSnapshot(self, request, context):
        self.store.delete_snapshot(request.name)
        return pb.DeleteSnapshotResponse()

    @unary
    def RestoreSnapshot(self, request, context):
        info = self.store.restore_snapshot(request.name)
        stats = self.store.store_stats()
        return pb.RestoreSnapshotResponse(snapshot=snapshot_to_proto(info),
                                          duration_seconds=stats.get("restore_seconds_last", 0.0))

    @streaming
    def Export(self, request, context):
        config = self.store.describe_table(request.table)
        chunk_rows = self._export_chunk_rows(config, request.chunk_rows)
        if request.HasField("since_sequence"):          # replication: a delta export (replication_service.py)
            yield from self.export_delta(request, chunk_rows, context)
            return
        export = self.store.export_table(request.table, chunk_rows)
        try:
            header = {"config": table_config_to_proto(export.config), "estimated_rows": export.estimated_rows}
            header.update(sequence=export.sequence, feed_id=self.store.changes.feed_id)   # replication
            for chunk in export:
                check_active(context)
                yield pb.ExportChunk(ids=encode_ids(chunk.ids), weights=encode_tensor(chunk.weights),
                                     state=encode_tensor(chunk.state),
                                     meta=encode_tensor(chunk.meta.astype(np.int64)), **header)
                header = {}
            if header:                                    # an empty table: the header alone
                yield pb.ExportChunk(
                    ids=b"", weights=encode_tensor(np.zeros((0, config.dim), weight_dtype(config.dtype))),
                    state=encode_tensor(np.zeros((0, config.state_dim), np.float32)),
                    meta=encode_tensor(np.zeros((0, 3), np.int64)), **header)
        finally:
            export.close()

    def _export_chunk_rows(self, config, requested: int) -> int | None:
        row_bytes = 8 + config.dim * weight_dtype(config.dtype).itemsize + config.state_dim * 4 + 24
        most = max(1, (self.config.max_message_bytes - CHUNK_OVERHEAD) // row_bytes)
        if requested < 0 or requested > most:
            raise InvalidArgument(f"chunk_rows: must be in [0, {most}] for table {config.name!r} "
                                  f"(the message limit), got {requested}")
        return requested or min(most, max(1, (2 << 20) // row_bytes))

    @unary
    def Import(self, request_iterator, context):
        stager = None
        try:
            for index, request in enumerate(request_iterator):
                check_active(context)
                if stager is None:
                    stager = self._begin_import(request)
                elif request.table and request.table != stager.table.name:
                    raise InvalidArgument(f"table: chunk {index} names {request.table!r} "
                                          f"but the stream began with {stager.table.name!r}")
                stager.add(decode_ids(request.ids, "ids"), decode_tensor(request.weights, "weights"),
                           decode_tensor(request.state, "state") if request.HasField("state") else None,
                           decode_tensor(request.meta, "meta") if request.HasField("meta") else None)
            if stager is None:
                raise InvalidArgument("table: the import stream had no chunk")
            check_active(context)
            created, rows = stager.created, self.store.commit_import(stager)
            stager = None
            return pb.ImportResponse(rows=rows, created=created)
        finally:
            if stager is not None:
                self.store.abort_import(stager)

    def _begin_import(self, request):
        mode = IMPORT_MODES.get(request.mode)
        if mode is None:
            raise InvalidArgument(f"mode: unknown import mode {request.mode}; expected one of {sorted(IMPORT_MODES)}")
        config = None
        if request.HasField("config"):
            message = pb.TableConfig()
            message.CopyFrom(request.config)
            message.name = request.table
            config = table_config_from_proto(message)
        return self.store.stage_import(request.table, mode, config)
