"""KVStoreClient: the service's RPCs one to one, with NumPy (or torch) batches.

Large batches are split into messages of about `chunk_bytes` and streamed;
results come back reassembled in request order. Every call has a deadline.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from kvstore_proto.freed_memory import keep_freed_memory as _keep_freed_memory
from kvstore_proto.tensors import (
    WIRE_DTYPES,
    WireError,
    decode_lookup_response,
    encode_ids,
    encode_tensor,
)
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc

from .arrays import IDS_DTYPE, as_ids, as_rows, chunks, cuda_device, like, take_rows, to_numpy
from .credentials import open_channel
from .errors import InternalError, InvalidArgumentError, KVStoreError
from .errors import rpc_errors as _rpc
from .gradient_messages import GradientChunk
from .gradient_messages import serialize as serialize_gradients
from .leases import LeaseKeeper
from .reassembly import Place, Reassembly
from .replication import ReplicationMethods
from .same_host import SameHostPath
from .snapshots import SnapshotMethods
from .writes import ClientStream, streamed_write

ON_MISS = {
    "init_insert": pb.ON_MISS_INIT_INSERT,
    "init": pb.ON_MISS_INIT,
    "zeros": pb.ON_MISS_ZEROS,
    "error": pb.ON_MISS_ERROR,
}
ID_BYTES = 8




MESSAGE_OVERHEAD = 1024   # bytes a message may carry beyond its chunk: table name, dtypes, shapes


class KVStoreClient(ReplicationMethods, SnapshotMethods):
    def __new__(cls, address: Any = None, *args: Any, replicas: int | None = None, **kwargs: Any):
        """A list of addresses, a comma-separated string or `replicas=N` make a sharded client
        (kvstore_client.sharding.ShardedClient, docs/scale-out.md); one address stays one server."""
        if cls is KVStoreClient and (not isinstance(address, str) or "," in address or replicas is not None):
            from .sharding import ShardedClient

            return ShardedClient(address, *args, replicas=replicas, **kwargs)
        return super().__new__(cls)

    def __init__(self, address: str, timeout: float = 30.0, max_message_bytes: int = 16 << 20,
                 chunk_bytes: int = 2 << 20, *, token: str | None = None, root_certificates: bytes | None = None,
                 certificate_chain: bytes | None = None, private_key: bytes | None = None,
                 tls: bool | None = None, insecure: bool = False, same_host: bool | str = False,
                 keep_freed_memory: bool = True):
        """`token`: bearer token sent with every call. TLS is on when `tls` or any certificate is given:
        `root_certificates` (PEM CA bundle; system roots when None) checks the server,
        `certificate_chain` and `private_key` (PEM) are the client's certificate for mutual TLS.
        A token goes in clear only to this machine, unless `insecure`.
        `same_host`: move rows through shared memory with a server on this machine ("auto": when it
        can, else the network path; True: required; False, the default: never; docs/same-host.md).
        `keep_freed_memory`: tune this process's glibc malloc to reuse freed memory for large
        buffers instead of returning it (kvstore_proto.freed_memory): each received message then
        costs no page faults (a 4,096-row network lookup's client CPU fell to about a third on a
        VM). Process-wide, and it keeps up to 256 MiB of freed heap; False leaves malloc alone."""
        if chunk_bytes < 1 or chunk_bytes + MESSAGE_OVERHEAD > max_message_bytes:
            raise InvalidArgumentError(
                message=f"chunk_bytes: must be in [1, max_message_bytes - {MESSAGE_OVERHEAD}], got {chunk_bytes}")
        if keep_freed_memory:
            _keep_freed_memory(arenas=None)       # the trainer's threads keep their own arenas
        self.address = address
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._channel = open_channel(address, [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ], token=token, root_certificates=root_certificates, certificate_chain=certificate_chain,
            private_key=private_key, tls=tls, insecure=insecure)
        self._stub = pb_grpc.EmbeddingStoreStub(self._channel)
        # Lookup responses come as bytes and are read in place (decode_lookup_response); a lookup of
        # one chunk is sent as a unary call (the same on the wire, no thread per call; see ClientStream)
        self._lookup = self._channel.stream_stream(
            _method("Lookup"), request_serializer=pb.LookupRequest.SerializeToString, response_deserializer=None)
        self._lookup_one = self._channel.unary_unary(
            _method("Lookup"), request_serializer=pb.LookupRequest.SerializeToString, response_deserializer=None)
        # Export responses arrive as bytes, read in place (snapshots.decoded)
        self._export = self._channel.unary_stream(
            _method("Export"), request_serializer=pb.ExportRequest.SerializeToString, response_deserializer=None)
        # Import and ImportChain requests go as bytes built with one copy of the rows (snapshots.rows_request)
        self._import = ClientStream(self._channel, _method("Import"), None, pb.ImportResponse.FromString)
        self._import_chain = ClientStream(self._channel, _method("ImportChain"), None, pb.ImportResponse.FromString)
        # ApplyGradients requests go as bytes built with one copy of the rows (gradient_messages.py)
        self._apply_gradients = ClientStream(self._channel, _method("ApplyGradients"), serialize_gradients,
                                             pb.ApplyGradientsResponse.FromString)
        self._update = ClientStream(self._channel, _method("Update"), pb.UpdateRequest.SerializeToString,
                                    pb.UpdateResponse.FromString)
        self._delete = ClientStream(self._channel, _method("Delete"), pb.DeleteRequest.SerializeToString,
                                    pb.DeleteResponse.FromString)
        self._row_shapes: dict[str, tuple[int, int]] = {}   # table -> (dim, weight itemsize)
        self._lease = LeaseKeeper(self._stub, timeout)     # holds this client's prefetch locks
        self.same_host = SameHostPath(self._channel, address, same_host, timeout, self.describe_table, token)

    def close(self) -> None:
        self.same_host.close()              # segments detached and unlinked
        self._lease.close()                 # the server releases this client's locks now
        self._channel.close()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- tables ----------------------------------------------------------------

    def create_table(self, name: str, dim: int, dtype: str = "float32", optimizer: dict | None = None,
                     initializer: dict | None = None, cache: dict | None = None,
                     allow_nonfinite: bool = False, eviction: dict | None = None) -> dict:
        """Create a table; returns its full config (defaults filled in by the server)."""
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or not -2**31 <= dim < 2**31:
            raise InvalidArgumentError(message=f"dim: must be an int32 integer, got {dim!r}")
        config = _message(pb.TableConfig, {"name": name, "dim": int(dim), "dtype": dtype,
                                           "allow_nonfinite": allow_nonfinite}, "config")
        for field, kind, value in (("optimizer", pb.OptimizerConfig, optimizer),
                                   ("initializer", pb.InitializerConfig, initializer),
                                   ("cache", pb.CacheConfig, cache),
                                   ("eviction", pb.EvictionConfig, eviction)):
            if value is not None:
                getattr(config, field).CopyFrom(_message(kind, value, field))
        self._row_shapes.pop(name, None)
        with _rpc():
            response = self._stub.CreateTable(pb.CreateTableRequest(config=config), timeout=self.timeout)
        return _to_dict(response.config)

    def drop_table(self, name: str) -> None:
        self._row_shapes.pop(name, None)
        with _rpc():
            self._stub.DropTable(pb.DropTableRequest(table=name), timeout=self.timeout)

    def health(self, service: str = "") -> str:
        """The server's health status (SERVING, NOT_SERVING, ...) for `service` ("" = the whole server).
        Needs the grpcio-health-checking package; the health service asks for no token."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with _rpc():
            response = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def list_tables(self) -> list[str]:
        with _rpc():
            return list(self._stub.ListTables(pb.ListTablesRequest(), timeout=self.timeout).tables)

    def describe_table(self, name: str) -> dict:
        with _rpc():
            response = self._stub.DescribeTable(pb.DescribeTableRequest(table=name), timeout=self.timeout)
        return _to_dict(response.config)

    def stats(self, table: str) -> dict[str, float]:
        with _rpc():
            return dict(self._stub.Stats(pb.StatsRequest(table=table), timeout=self.timeout).counters)

    # --- rows --------------------------------------------------------------------

    def lookup(self, table: str, ids: Any, on_miss: str = "init_insert", with_state: bool = False,
               out: np.ndarray | None = None):
        """Rows of `ids` in request order: weights [n, dim], or (weights, state) when with_state.
        `out`: a writable [n, dim] array of the table's dtype that receives the weights (a buffer a
        training loop reuses, or pinned memory): no result is allocated, no page is faulted in.
        With CUDA tensors (`ids` or `out`) the rows come back on their GPU; on the same-host path
        a GPU table's server writes them there itself (CUDA IPC, docs/same-host.md)."""
        if (type(ids) is np.ndarray and ids.dtype == IDS_DTYPE and ids.ndim == 1 and out is None and not with_state
                and self.same_host.active and on_miss in ON_MISS):      # a loop's lookup: few steps (same_host.py)
            rows = self.same_host.lookup_owned(table, ids, ON_MISS[on_miss], self._lease.current)
            if rows is not None:
                return rows
        id_array = as_ids(ids)
        device = cuda_device(ids, out)
        if device is not None:
            if not with_state and self.same_host.usable():
                rows = self.same_host.lookup_to_device(table, id_array, device, out, ON_MISS[on_miss],
                                                       self._lease.current)
                if rows is not None:
                    return rows
            if out is not None:                  # through the host, then to the caller's tensor
                weights = self.lookup(table, id_array, on_miss, with_state)
                out.copy_(like(weights[0] if with_state else weights, out))
                return (out, like(weights[1], out)) if with_state else out
        if out is None and not with_state and on_miss in ON_MISS and self.same_host.usable():
            rows = self.same_host.lookup_owned(table, id_array, ON_MISS[on_miss], self._lease.current)
            if rows is not None:                 # over the segment the server wrote: no copy
                return like(rows, ids)
        result = Reassembly(len(id_array), with_state, out=out)
        self.lookup_into(table, id_array, result.sink(), on_miss, with_state)
        if with_state:
            return like(result.weights, ids), like(result.state, ids)
        return like(result.weights, ids)

    def lookup_into(self, table: str, id_array: np.ndarray, place: Place, on_miss: str = "init_insert",
                    with_state: bool = False) -> None:
        """Look up int64 `id_array`, handing each answer chunk to `place(start, stop, weights, state)`
        as read-only views of the received bytes (reassembly.py copies them once, to their place)."""
        if on_miss not in ON_MISS:
            raise InvalidArgumentError(message=f"on_miss: unknown mode {on_miss!r}; expected one of {list(ON_MISS)}")
        if not with_state and self.same_host.usable():
            return self.same_host.lookup_into(table, id_array, place, ON_MISS[on_miss], self._lease.current)
        ranges = chunks(len(id_array), self._response_row_bytes(table, with_state), self.chunk_bytes)
        requests = (
            pb.LookupRequest(table=table, ids=encode_ids(id_array[start:stop]), on_miss=ON_MISS[on_miss],
                             with_state=with_state, lease=self._lease.current)
            for start, stop in ranges
        )
        index = -1
        try:
            with _rpc():
                if len(ranges) == 1:             # one chunk: one answer, as a unary call
                    (start, stop), = ranges
                    response = self._lookup_one(next(requests), timeout=self.timeout)
                    index = 0
                    place(start, stop, *_decode(response, stop - start, with_state))
                    return
                responses = self._lookup(requests, timeout=self.timeout)
                try:
                    for index, response in enumerate(responses):
                        start, stop = _range(ranges, index)
                        place(start, stop, *_decode(response, stop - start, with_state))
                finally:
                    responses.cancel()           # a no-op once the call is done; ends it on our own errors
        except KVStoreError:
            self._row_shapes.pop(table, None)   # the table may have changed under us
            raise
        if index != len(ranges) - 1:
            raise InternalError(message=f"lookup: the server answered {index + 1} of {len(ranges)} chunks")

    def update(self, table: str, ids: Any, weights: Any, state: Any = None, scores: Any = None) -> int:
        """Overwrite rows (and optimizer state, and per-id feature scores for eviction, when given);
        returns the unique rows written."""
        id_array = as_ids(ids)
        if cuda_device(weights) is not None and self.same_host.usable():
            written = self.same_host.update_from_device(
                table, id_array, weights, None if state is None else as_rows(state, len(id_array), "state"),
                _as_scores(scores, len(id_array)))
            if written is not None:
                return written
        weight_array = as_rows(weights, len(id_array), "weights")
        state_array = None if state is None else as_rows(state, len(id_array), "state")
        score_array = _as_scores(scores, len(id_array))
        if self.same_host.usable():
            return self.same_host.update(table, id_array, weight_array, state_array, score_array)
        row_bytes = ID_BYTES + weight_array[:1].nbytes + (0 if state_array is None else state_array[:1].nbytes) + 4
        ranges = chunks(len(id_array), row_bytes, self.chunk_bytes)

        def requests(key: str) -> Iterator[pb.UpdateRequest]:
            for start, stop in ranges:
                yield pb.UpdateRequest(
                    table=table, ids=encode_ids(id_array[start:stop]), idempotency_key=key,
                    weights=_encode(weight_array[start:stop], "weights"),
                    state=None if state_array is None else _encode(state_array[start:stop], "state"),
                    scores=None if score_array is None else _encode(score_array[start:stop], "scores"))

        return streamed_write(self._update, requests, self.timeout).rows

    def delete(self, table: str, ids: Any) -> int:
        """Remove rows from every tier; returns the unique ids processed (absent ones included)."""
        id_array = as_ids(ids)
        ranges = chunks(len(id_array), ID_BYTES, self.chunk_bytes)

        def requests(key: str) -> Iterator[pb.DeleteRequest]:
            for start, stop in ranges:
                yield pb.DeleteRequest(table=table, ids=encode_ids(id_array[start:stop]), idempotency_key=key)

        return streamed_write(self._delete, requests, self.timeout).rows

    # --- training --------------------------------------------------------------------

    def apply_gradients(self, table: str, ids: Any, grads: Any, release: bool = False, scores: Any = None) -> int:
        """Push gradients: duplicates are summed, then one optimizer step per unique row runs on the
        server. With `release`, this client's prefetch locks on these ids are released too.
        `scores` (one per id) become the rows' feature scores for eviction. Returns the unique rows stepped."""
        id_array = as_ids(ids)
        if cuda_device(grads) is not None and self.same_host.usable():
            stepped = self.same_host.push_device_gradients(
                table, id_array, grads.float(), self._lease.acquire() if release else "",
                _as_scores(scores, len(id_array)))
            if stepped is not None:
                return stepped
        grad_array = as_rows(grads, len(id_array), "grads").astype(np.float32, copy=False)
        return self.push_gradients(table, id_array, grad_array, None, release, _as_scores(scores, len(id_array)))

    def push_gradients(self, table: str, id_array: np.ndarray, grad_array: np.ndarray, positions: np.ndarray | None,
                       release: bool = False, score_array: np.ndarray | None = None) -> int:
        """apply_gradients of the rows at `positions` (all rows when None) of checked int64 ids and
        float32 gradients: each message gathers its own rows, so a shard's part is never copied whole."""
        owner = self._lease.acquire() if release else ""
        if self.same_host.usable():
            return self.same_host.push_gradients(table, id_array, grad_array, positions, owner, score_array)
        n = len(id_array) if positions is None else len(positions)
        ranges = chunks(n, ID_BYTES + grad_array[:1].nbytes + 4, self.chunk_bytes)

        def rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
            return array[start:stop] if positions is None else take_rows(array, positions[start:stop])

        def requests(key: str) -> Iterator[GradientChunk]:
            for start, stop in ranges:
                yield GradientChunk(table, rows(id_array, start, stop), rows(grad_array, start, stop), owner, key,
                                    None if score_array is None else rows(score_array, start, stop))

        return streamed_write(self._apply_gradients, requests, self.timeout).rows

    def prefetch(self, table: str, ids: Any, lock: bool = False) -> int:
        """Warm the server's cache with these rows (initializing missing ones). With `lock`, pin them
        until `apply_gradients(..., release=True)`, `release`, or this client closes or goes away.
        Returns how many rows are cached."""
        id_array = as_ids(ids)
        owner = self._lease.acquire() if lock else ""
        requests = (
            pb.PrefetchRequest(table=table, ids=encode_ids(id_array[start:stop]), lock=lock, owner=owner)
            for start, stop in chunks(len(id_array), ID_BYTES, self.chunk_bytes)
        )
        with _rpc():
            return self._stub.Prefetch(requests, timeout=self.timeout).cached

    def release(self, table: str, ids: Any) -> int:
        """Unpin rows this client locked with prefetch; returns how many were released."""
        request = pb.ReleaseRequest(table=table, ids=encode_ids(as_ids(ids)), owner=self._lease.current)
        with _rpc():
            return self._stub.Release(request, timeout=self.timeout).released

    # --- eviction --------------------------------------------------------------------

    def evict(self, table: str) -> dict[str, int]:
        """Run one eviction sweep of the table now; rows evicted by reason."""
        with _rpc():
            return dict(self._stub.Evict(pb.EvictRequest(table=table), timeout=self.timeout).evicted)

    def restore_rows(self, table: str, ids: Any) -> int:
        """Bring archived rows back (ids that have a row again are left alone); returns rows restored."""
        request = pb.RestoreRowsRequest(table=table, ids=encode_ids(as_ids(ids)))
        with _rpc():
            return self._stub.RestoreRows(request, timeout=self.timeout).rows

    def _response_row_bytes(self, table: str, with_state: bool) -> int:
        """Upper bound on the tensor bytes of one looked-up row, to size request chunks (a
        response carries no ids: 4,096 rows of 128 float32 fill one 2 MiB chunk)."""
        if table not in self._row_shapes:
            config = self.describe_table(table)
            dtype = WIRE_DTYPES.get(config["dtype"] or "float32", WIRE_DTYPES["float64"])
            self._row_shapes[table] = (config["dim"], dtype.itemsize)
        dim, itemsize = self._row_shapes[table]
        # state_dim is at most 2 * dim + 1 (Adam: 2 * dim float32 values)
        return dim * itemsize + (4 * (2 * dim + 1) if with_state else 0)


def _as_scores(scores: Any, n: int) -> np.ndarray | None:
    if scores is None:
        return None
    array = to_numpy(scores, "scores")
    if array.shape != (n,):
        raise InvalidArgumentError(message=f"scores: expected shape ({n},) for {n} ids, got {array.shape}")
    return array.astype(np.float32, copy=False)


def _message(kind: type, value: dict, field: str):
    if not isinstance(value, dict):
        raise InvalidArgumentError(message=f"{field}: must be a dict, got {type(value).__name__}")
    try:
        return kind(**value)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(message=f"{field}: {exc}") from None


def _to_dict(message) -> dict:
    """Every field of a message, zero values included, nested messages as dicts."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        out[field.name] = _to_dict(value) if field.message_type is not None else value
    return out


def _encode(array: np.ndarray, field: str) -> dict:
    try:
        return encode_tensor(array)
    except WireError as exc:
        raise InvalidArgumentError(message=f"{field}: {exc}") from None


def _decode(response: bytes, rows: int, with_state: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Weights (and state) of one serialized lookup response chunk, checked against the request."""
    try:
        weights, state = decode_lookup_response(response)
    except WireError as exc:
        raise InternalError(message=f"lookup: malformed response: {exc}") from None
    for field, array in [("weights", weights)] + ([("state", state)] if with_state else []):
        if array is None or array.ndim != 2 or array.shape[0] != rows:
            shape = None if array is None else array.shape
            raise InternalError(message=f"lookup: response {field} has shape {shape}, expected {rows} rows")
    return weights, state


def _method(name: str) -> str:
    """The gRPC path of an EmbeddingStore method."""
    return f"/{pb.DESCRIPTOR.services_by_name['EmbeddingStore'].full_name}/{name}"


def _range(ranges: list[tuple[int, int]], index: int) -> tuple[int, int]:
    if index >= len(ranges):
        raise InternalError(message=f"lookup: the server sent more than {len(ranges)} response chunks")
    return ranges[index]
