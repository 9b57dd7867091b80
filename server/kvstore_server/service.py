"""The servicer: converts messages, calls the Store, lets `rpc` map the errors.

Update and Delete buffer and validate every chunk before applying the batch
once, so a bad chunk anywhere in a stream changes nothing.
"""
from __future__ import annotations

import numpy as np
from kvstore_proto.tensors import decode_ids, decode_tensor, encode_lookup_response
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc

from kvstore import Store
from kvstore.dtypes import weight_dtype
from kvstore.errors import InvalidArgument, ResourceExhausted

from .config import ServerConfig
from .messages import concat, on_miss_name, table_config_from_proto, table_config_to_proto
from .metrics import Metrics
from .replication_service import ReplicationRPCs
from .rpc import check_active, streaming, unary
from .sessions import Sessions
from .transfer_service import SnapshotRPCs

MESSAGE_OVERHEAD = 4096   # room for framing and the non-tensor fields of a response


class EmbeddingStoreService(ReplicationRPCs, SnapshotRPCs, pb_grpc.EmbeddingStoreServicer):
    def __init__(self, store: Store, config: ServerConfig, metrics: Metrics):
        self.store = store
        self.config = config
        self.metrics = metrics
        self.sessions = Sessions(store)

    # --- tables ----------------------------------------------------------------

    @unary
    def CreateTable(self, request, context):
        config = self.store.create_table(table_config_from_proto(request.config))
        return pb.CreateTableResponse(config=table_config_to_proto(config))

    @unary
    def DropTable(self, request, context):
        self.store.drop_table(request.table)
        return pb.DropTableResponse()

    @unary
    def ListTables(self, request, context):
        return pb.ListTablesResponse(tables=self.store.list_tables())

    @unary
    def DescribeTable(self, request, context):
        return pb.DescribeTableResponse(config=table_config_to_proto(self.store.describe_table(request.table)))

    @unary
    def Stats(self, request, context):
        return pb.StatsResponse(table=request.table, counters=self.store.stats(request.table))

    # --- rows --------------------------------------------------------------------

    @streaming
    def Lookup(self, request_iterator, context):
        for request in request_iterator:
            check_active(context)
            ids = decode_ids(request.ids, "ids")
            self._check_chunk(len(ids))
            on_miss = on_miss_name(request.on_miss)
            self._check_response_size(request.table, len(ids), request.with_state)
            result = self.store.lookup(request.table, ids, on_miss, request.with_state)
            yield encode_lookup_response(result.weights, result.state)   # serialized: one copy of the rows

    @unary
    def Update(self, request_iterator, context):
        table, dim, with_state = None, 0, False
        ids_parts, weight_parts, state_parts, score_parts = [], [], [], []
        rows = 0
        for index, request in enumerate(request_iterator):
            check_active(context)
            table = self._stream_table(table, request.table, index)
            if index == 0:                              # unknown table: NOT_FOUND before buffering
                dim = self.store.describe_table(table).dim
                with_state = request.HasField("state")
            ids = decode_ids(request.ids, "ids")
            rows = self._count_rows(rows, len(ids))
            weights = decode_tensor(request.weights, "weights")
            _check_matrix(weights, len(ids), dim, "weights", weight_parts)
            if request.HasField("state") != with_state:
                raise InvalidArgument(f"state: chunk {index} {'lacks' if with_state else 'has'} state; "
                                      "give state in every chunk of an update or in none")
            if with_state:
                state = decode_tensor(request.state, "state")
                _check_matrix(state, len(ids), None, "state", state_parts)
                state_parts.append(state)
            _collect_scores(request, index, len(ids), score_parts)
            ids_parts.append(ids)
            weight_parts.append(weights)
        if table is None:
            return pb.UpdateResponse(rows=0)
        check_active(context)
        ids = concat(ids_parts)
        weights = concat(weight_parts)
        state = concat(state_parts) if with_state else None
        scores = concat(score_parts) if score_parts else None
        return pb.UpdateResponse(rows=self.store.update(table, ids, weights, state, scores))

    @unary
    def Delete(self, request_iterator, context):
        table, ids_parts, rows = None, [], 0
        for index, request in enumerate(request_iterator):
            check_active(context)
            table = self._stream_table(table, request.table, index)
            if index == 0:
                self.store.describe_table(table)        # unknown table: NOT_FOUND before buffering
            ids = decode_ids(request.ids, "ids")
            rows = self._count_rows(rows, len(ids))
            ids_parts.append(ids)
        if table is None:
            return pb.DeleteResponse(rows=0)
        check_active(context)
        return pb.DeleteResponse(rows=self.store.delete(table, concat(ids_parts)))

    # --- training --------------------------------------------------------------------

    @unary
    def ApplyGradients(self, request_iterator, context):
        table, dim, owner = None, 0, ""
        ids_parts, grad_parts, score_parts, rows = [], [], [], 0
        for index, request in enumerate(request_iterator):
            check_active(context)
            table = self._stream_table(table, request.table, index)
            ids = decode_ids(request.ids, "ids")
            rows = self._count_rows(rows, len(ids))
            grads = decode_tensor(request.grads, "grads")
            if index == 0:
                dim = self.store.describe_table(table).dim
                owner = request.owner
            _check_matrix(grads, len(ids), dim, "grads", grad_parts)
            _collect_scores(request, index, len(ids), score_parts)
            ids_parts.append(ids)
            grad_parts.append(grads)
        if table is None:
            return pb.ApplyGradientsResponse(rows=0)
        check_active(context)
        scores = concat(score_parts) if score_parts else None
        stepped = self.store.apply_gradients(table, concat(ids_parts), concat(grad_parts), owner or None, scores)
        return pb.ApplyGradientsResponse(rows=stepped)

    @unary
    def Prefetch(self, request_iterator, context):
        table, lock, owner, ids_parts, rows = None, False, "", [], 0
        for index, request in enumerate(request_iterator):
            check_active(context)
            table = self._stream_table(table, request.table, index)
            ids_parts.append(decode_ids(request.ids, "ids"))
            rows = self._count_rows(rows, len(ids_parts[-1]))
            if index == 0:
                self.store.describe_table(table)
                lock, owner = request.lock, request.owner
                if lock:
                    self.sessions.check(owner)
        if table is None:
            return pb.PrefetchResponse(cached=0)
        cached = self.store.prefetch(table, concat(ids_parts), lock, owner)
        if lock:
            self.sessions.settle(owner)
        return pb.PrefetchResponse(cached=cached)

    @unary
    def Release(self, request, context):
        ids = decode_ids(request.ids, "ids")
        self._count_rows(0, len(ids))
        return pb.ReleaseResponse(released=self.store.release(request.table, ids, request.owner))

    @streaming
    def OpenSession(self, request_iterator, context):
        """Hands out an owner id; when the stream ends, for whatever reason, its locks are released."""
        owner = self.sessions.open()
        context.add_callback(lambda: self.sessions.close(owner))
        yield pb.SessionEvent(owner=owner)
        for _ in request_iterator:          # the client sends nothing; this returns when it goes away
            pass

    # --- eviction --------------------------------------------------------------------

    @unary
    def Evict(self, request, context):
        return pb.EvictResponse(evicted=self.store.evict(request.table))

    @unary
    def RestoreRows(self, request, context):
        ids = decode_ids(request.ids, "ids")
        self._count_rows(0, len(ids))
        return pb.RestoreRowsResponse(rows=self.store.restore_rows(request.table, ids))

    # --- limits --------------------------------------------------------------------

    def _check_chunk(self, n: int) -> None:
        if n > self.config.max_chunk_rows:
            raise ResourceExhausted(
                f"ids: {n} rows in one chunk exceed the server limit of {self.config.max_chunk_rows}; "
                "split the batch into smaller chunks"
            )

    def _count_rows(self, total: int, n: int) -> int:
        self._check_chunk(n)
        total += n
        if total > self.config.max_request_rows:
            raise ResourceExhausted(
                f"ids: more than {self.config.max_request_rows} rows in one request (the server limit); "
                "split the batch into several calls"
            )
        return total

    def _check_response_size(self, table: str, n: int, with_state: bool) -> None:
        config = self.store.describe_table(table)
        row_bytes = config.dim * weight_dtype(config.dtype).itemsize + (config.state_dim * 4 if with_state else 0)
        size = n * row_bytes + MESSAGE_OVERHEAD
        if size > self.config.max_message_bytes:
            raise ResourceExhausted(
                f"ids: {n} rows of table {table!r} make a {size}-byte response, over the message limit of "
                f"{self.config.max_message_bytes} bytes; send at most {self._rows_per_message(row_bytes)} ids "
                "per chunk"
            )

    def _rows_per_message(self, row_bytes: int) -> int:
        return max(1, (self.config.max_message_bytes - MESSAGE_OVERHEAD) // max(1, row_bytes))

    @staticmethod
    def _stream_table(current: str | None, named: str, index: int) -> str:
        """The table of a client stream: named by its first chunk; later chunks repeat it or leave it empty."""
        if current is None:
            return named
        if named and named != current:
            raise InvalidArgument(f"table: chunk {index} names {named!r} but the stream began with {current!r}")
        return current


def _check_matrix(values: np.ndarray, n: int, width: int | None, field: str, previous: list[np.ndarray]) -> None:
    """One chunk's [n, width] tensor, consistent in dtype and width with earlier chunks."""
    if values.ndim != 2 or values.shape[0] != n:
        raise InvalidArgument(f"{field}: expected shape ({n}, {width if width is not None else 'k'}) "
                              f"for {n} ids, got {values.shape}")
    if width is not None and values.shape[1] != width:
        raise InvalidArgument(f"{field}: expected {width} columns (the table dim), got {values.shape[1]}")
    if previous and (values.dtype != previous[0].dtype or values.shape[1] != previous[0].shape[1]):
        raise InvalidArgument(f"{field}: every chunk must have the dtype and width of the first "
                              f"({previous[0].dtype}, {previous[0].shape[1]}), got ({values.dtype}, {values.shape[1]})")


def _collect_scores(request, index: int, n: int, parts: list[np.ndarray]) -> None:
    """Optional per-id scores of one chunk: [n] numbers, in every chunk or in none."""
    has = request.HasField("scores")
    if index > 0 and has != bool(parts):
        raise InvalidArgument(f"scores: chunk {index} {'has' if has else 'lacks'} scores; "
                              "give scores in every chunk or in none")
    if has:
        scores = decode_tensor(request.scores, "scores")
        if scores.shape != (n,):
            raise InvalidArgument(f"scores: expected shape ({n},) for {n} ids, got {scores.shape}")
        parts.append(scores)
