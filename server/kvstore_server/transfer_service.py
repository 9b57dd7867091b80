"""Snapshot, export and import RPCs: a mixin of the servicer, thin like the rest.

Export streams chunks read from a consistent view of the table; an error
raised mid-stream still reaches the client with its code (`rpc.bind`).
Import stages every chunk on the server's disk and applies them only
after the last one arrived and passed validation, so a bad chunk, a cancelled
call or a dropped connection changes nothing.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
from kvstore_proto.tensors import decode_ids, decode_tensor
from kvstore_proto.v1 import kvstore_pb2 as pb

from kvstore import Store, TableConfig
from kvstore.dtypes import weight_dtype
from kvstore.errors import InvalidArgument
from kvstore.snapshots import SnapshotInfo
from kvstore.transfer import rows_to_chunk

from .allocator import return_freed_memory
from .budgets import check_new_table
from .data_budget import DataBudget, with_default_max_rows
from .data_paths import check_snapshot, check_staging
from .export_encoding import ENCODER, encode_export_chunk
from .idempotency import RecentWrites
from .messages import table_config_from_proto, table_config_to_proto
from .races import across_tables
from .rpc import StoreWork, whole_stream

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
    work: StoreWork
    recent: RecentWrites
    data_budget: DataBudget

    async def CreateSnapshot(self, request, context):
        await self.work(check_snapshot, self.store.data_dir, request.name)
        info = await self.work(across_tables, self.store, "name", self.store.create_snapshot, request.name)
        return pb.CreateSnapshotResponse(snapshot=snapshot_to_proto(info))

    async def ListSnapshots(self, request, context):
        await self.work(check_snapshot, self.store.data_dir)
        snapshots = await self.work(self.store.list_snapshots)
        return pb.ListSnapshotsResponse(snapshots=[snapshot_to_proto(s) for s in snapshots])

    async def DeleteSnapshot(self, request, context):
        await self.work(check_snapshot, self.store.data_dir, request.name)
        await self.work(self.store.delete_snapshot, request.name)
        return pb.DeleteSnapshotResponse()

    async def RestoreSnapshot(self, request, context):
        await self.work(check_snapshot, self.store.data_dir, request.name)
        info = await self.work(self.store.restore_snapshot, request.name)
        stats = self.store.store_stats()
        return pb.RestoreSnapshotResponse(snapshot=snapshot_to_proto(info),
                                          duration_seconds=stats.get("restore_seconds_last", 0.0))

    async def Export(self, request, context):
        config = self.store.describe_table(request.table)
        chunk_rows = self._export_chunk_rows(config, request.chunk_rows)
        if request.HasField("since_sequence"):          # replication: a delta export (replication_service.py)
            async for chunk in self.export_delta(request, chunk_rows):
                yield chunk
            return
        export = await self.on_table(request.table, self.store.export_table, request.table, chunk_rows, ENCODER)
        try:
            header = pb.ExportChunk(config=table_config_to_proto(export.config), estimated_rows=export.estimated_rows,
                                    sequence=export.sequence, feed_id=self.store.changes.feed_id).SerializeToString()
            empty = rows_to_chunk(export.layout, np.zeros(0, np.int64), export.layout.empty(0))
            yield encode_export_chunk(empty, header)      # the header travels alone, before any row is read
            chunks = export.messages()                    # encoded by the worker process that reads them
            while (message := await self.on_table(request.table, next, chunks, None)) is not None:
                yield message
        finally:
            await asyncio.shield(self.work(export.close))

    def _export_chunk_rows(self, config, requested: int) -> int | None:
        row_bytes = 8 + config.dim * weight_dtype(config.dtype).itemsize + config.state_dim * 4 + 24
        most = max(1, (self.config.max_message_bytes - CHUNK_OVERHEAD) // row_bytes)
        if requested < 0 or requested > most:
            raise InvalidArgument(f"chunk_rows: must be in [0, {most}] for table {config.name!r} "
                                  f"(the message limit), got {requested}")
        return requested or min(most, max(1, (2 << 20) // row_bytes))

    async def Import(self, requests: AsyncIterator, context):
        async def commit(staged) -> pb.ImportResponse:
            rows = await self.on_table(staged.table.name, self.store.commit_import, staged)
            return pb.ImportResponse(rows=rows, created=staged.created)

        return await self.staged_import("Import", whole_stream(requests, context), self._begin_import,
                                        _add_import_chunk, commit)

    async def staged_import(self, method: str, requests: AsyncIterator, begin: Callable[[Any], Any],
                            add: Callable[[Any, Any], None], commit: Callable[[Any], Awaitable[pb.ImportResponse]],
                            rows_field: str = "") -> pb.ImportResponse:
        """The all-or-nothing import of a whole stream (Import, ImportChain): `begin(first request)` stages,
        `add(stager, request)` adds each chunk, and only a complete stream is committed, once per
        idempotency key (`rows_field` names the ImportRequest inside a request, if it is not one). A failed,
        cancelled or replayed call drops what it staged."""
        stager, key, prefix = None, "", f"{rows_field}." if rows_field else ""
        try:
            index = 0
            async for request in requests:
                rows = getattr(request, rows_field) if rows_field else request
                if stager is None:
                    stager, key = await self.work(begin, request), rows.idempotency_key
                elif rows.table and rows.table != stager.table.name:
                    raise InvalidArgument(f"{prefix}table: chunk {index} names {rows.table!r} "
                                          f"but the stream began with {stager.table.name!r}")
                await self.work(_add_counted, add, stager, request, self.data_budget)
                index += 1
            if stager is None:
                raise InvalidArgument(f"{prefix}table: the import stream had no chunk")

            async def commit_once():
                nonlocal stager
                staged, stager = stager, None         # from here the commit owns the staged files
                return await commit(staged)

            return await self.recent.once(method, key, commit_once)
        finally:
            if stager is not None:                    # cancelled, failed or a replayed retry: drop the staging
                await asyncio.shield(self.work(self.store.abort_import, stager))   # before the answer goes
            await asyncio.to_thread(return_freed_memory)   # the chunks and memtables this import freed

    def _begin_import(self, request):
        self.data_budget.check("an import")
        check_staging(self.store.data_dir)
        mode = IMPORT_MODES.get(request.mode)
        if mode is None:
            raise InvalidArgument(f"mode: unknown import mode {request.mode}; expected one of {sorted(IMPORT_MODES)}")
        config = None
        if request.HasField("config"):
            message = pb.TableConfig()
            message.CopyFrom(request.config)
            message.name = request.table
            config = table_config_from_proto(message, self.config.cache_device)
            config = with_default_max_rows(config, self.config.default_max_rows)
            if request.table not in self.store.list_tables():    # the import creates it: the table budgets apply
                check_new_table(self.store, config, self.config.max_tables, self.cache_budget)
        return self.store.stage_import(request.table, mode, config)


def _add_counted(add: Callable[[Any, Any], None], stager, request, budget: DataBudget) -> None:
    """`add` one chunk, then refuse the import once its rows pass the table's max_rows or the disk budget."""
    add(stager, request)
    budget.check_import(stager)


def _add_import_chunk(stager, request: pb.ImportRequest) -> None:
    add_rows(stager, request)


def add_rows(stager, rows: pb.ImportRequest, prefix: str = "") -> None:
    """Stage one chunk of rows: weights in the table's dtype (or a lossless widening), state float32."""
    stager.add(decode_ids(rows.ids, f"{prefix}ids"),
               decode_tensor(rows.weights, f"{prefix}weights", stager.table.config.dtype),
               decode_tensor(rows.state, f"{prefix}state", "float32") if rows.HasField("state") else None,
               decode_tensor(rows.meta, f"{prefix}meta") if rows.HasField("meta") else None)
