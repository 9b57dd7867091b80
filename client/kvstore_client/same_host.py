"""The same-host path of one KVStoreClient: lookups, updates and gradient pushes through shared memory.

When the client and its server share a machine, ids and rows go through this
client's shared-memory segments (shared_memory.py) and gRPC carries only the
request and reply headers (SharedLookup, SharedUpdate, SharedApplyGradients). The
server runs the very store calls of the network path, so results are the same.
A server that names a doorbell when it attaches a segment takes SharedLookup calls on
that Unix socket too (doorbell.py): the same call without gRPC's cost per call.

`same_host` of the client: "auto" uses it when the address is a
loopback one or a unix socket and the server attaches this client's first segment
(it has the path on and maps the segment: same host, same IPC namespace, same user),
and takes the network path otherwise; True requires it (FAILED_PRECONDITION saying
why, when it cannot be had); False (the default, so that existing deployments see the
same calls, metrics and figures) never uses it. Lookups with optimizer state go
over the network (their width is the server's to know). GPU tables and CUDA tensors:
rows GPU to GPU through CUDA IPC (cuda_ipc.py).
"""
from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from kvstore_proto.tensors import WIRE_DTYPES
from kvstore_proto.v1 import kvstore_pb2 as pb

from .arrays import as_rows, take_rows
from .credentials import is_loopback_address
from .cuda_ipc import CudaIpcCalls
from .doorbell import DoorbellClient, NotRung
from .errors import FailedPreconditionError, InvalidArgumentError, KVStoreError, UnavailableError
from .errors import rpc_errors as _rpc
from .reassembly import Place
from .shared_memory import NotAttached, Segment, SegmentPool, region_bytes, region_offsets
from .writes import BACKOFF_SECONDS, RETRIES

MODES = (True, False, "auto")
LOOKUP_CALL_ROWS = 1 << 20            # ids per segment lease (a lookup is not atomic: split freely)
PIECE_BYTES = 16 << 20                # rows per SharedLookup call of a large lookup (a call: ~1 ms of CPU) ...
PIECES_AHEAD = 1                      # ... and calls in flight beyond the one being copied
MAX_LOOKUP_SHAPES = 64                # lent lookups' layouts (and their requests per segment) kept; then afresh
_SERVICE = f"/{pb.DESCRIPTOR.services_by_name['EmbeddingStore'].full_name}/"


class _LentLookup(NamedTuple):
    """A lent lookup's layout in a segment (one size of ids of one table, in one mode): the bytes
    it takes, where its ids and rows lie, and its request as sent over each segment so far."""
    nbytes: int
    offsets: list[int]                # ids, rows
    requests: dict[str, bytes]        # segment name -> serialized SharedLookupRequest


class SameHostPath(CudaIpcCalls):
    """Whether this client uses shared memory with its server, and the calls that do."""

    def __init__(self, channel, address: str, mode: bool | str, timeout: float,
                 describe: Callable[[str], dict], token: str | None = None):
        if mode not in MODES or isinstance(mode, int) and not isinstance(mode, bool):
            raise InvalidArgumentError(message=f"same_host: expected True, False or 'auto', got {mode!r}")
        self.mode = mode
        self.timeout = timeout
        self._describe = describe
        self._tables: dict[str, tuple[int, str]] = {}       # table -> (dim, dtype name)
        self._gpu_tables: dict[str, bool] = {}               # table -> whether its cache is in GPU memory
        self._calls = {name: channel.unary_unary(_SERVICE + name, request_serializer=kind.SerializeToString,
                                                 response_deserializer=answer.FromString)
                       for name, kind, answer in (
                           ("AttachSegment", pb.AttachSegmentRequest, pb.AttachSegmentResponse),
                           ("AttachDeviceBuffer", pb.AttachDeviceBufferRequest, pb.AttachSegmentResponse),
                           ("DetachSegment", pb.DetachSegmentRequest, pb.DetachSegmentResponse),
                           ("SharedLookup", pb.SharedLookupRequest, pb.SharedLookupResponse),
                           ("SharedUpdate", pb.SharedUpdateRequest, pb.UpdateResponse),
                           ("SharedApplyGradients", pb.SharedApplyGradientsRequest, pb.ApplyGradientsResponse))}
        self._token = token
        self.doorbell: DoorbellClient | None = None          # set by the server's answer to an attach
        self._lent_lookups: dict[tuple, _LentLookup] = {}   # (table, n, on_miss, lease, dim, dtype) -> its layout
        self.pool = SegmentPool(self._attach, self._detach)
        self.init_cuda_ipc()
        self.active: bool | None = None if mode else False      # None: not asked yet
        self.reason = "" if mode else "same_host=False"
        if mode == "auto" and not is_loopback_address(address):
            self.active, self.reason = False, f"{address} is not a loopback address or unix socket"

    def usable(self) -> bool:
        """Whether calls go through shared memory (asks the server once)."""
        if self.active is None:
            try:
                self.pool.check()
                self.active = True
            except NotAttached as exc:
                self._refuse(str(exc))
            except KVStoreError as exc:
                if exc.code.name != "UNIMPLEMENTED":
                    raise
                self._refuse("the server has no same-host path (an older version)")
        return self.active

    def _refuse(self, reason: str) -> None:
        self.active, self.reason = False, reason
        if self.mode is True:
            raise FailedPreconditionError(message=f"same_host: {reason}")

    def close(self) -> None:
        if self.doorbell is not None:
            self.doorbell.close()
        self.pool.close()
        for pool in self._device_pools.values():
            if pool is not None:
                pool.close()

    # --- calls ----------------------------------------------------------------------

    def lookup_into(self, table: str, id_array: np.ndarray, place: Place, on_miss: int, lease: str) -> None:
        """Rows of `id_array` handed to `place(start, stop, weights, None)` as read-only views of the segment."""
        for start in range(0, max(1, len(id_array)), LOOKUP_CALL_ROWS):
            ids = id_array[start:start + LOOKUP_CALL_ROWS]
            self._with_table(table, self._lookup, table, ids, start, place, on_miss, lease)

    def lookup_owned(self, table: str, id_array: np.ndarray, on_miss: int, lease: str) -> np.ndarray | None:
        """The rows of `id_array` as an array over the segment the server wrote them into: no copy.
        The segment is that array's until it and every view of it are gone, then back to the pool
        (SegmentPool.lend). None for no ids, more than one segment's LOOKUP_CALL_ROWS, or MAX_LENT
        segments already lent to results still alive (the caller copies then)."""
        if not 0 < len(id_array) <= LOOKUP_CALL_ROWS or not self.pool.can_lend():
            return None
        return self._with_table(table, self._lookup_lent, table, id_array, on_miss, lease)

    def _lookup_lent(self, table: str, ids: np.ndarray, on_miss: int, lease: str, dim: int, dtype: str
                     ) -> np.ndarray:
        """One SharedLookup whose rows are returned over the segment, lent to them. What a lookup
        of this table, size and mode needs besides its ids is worked out once (`_LentLookup`): a
        loop's lookup, most of whose client-side time was Python run with cold caches, then does
        little more than copy its ids in and ring (the server splits a large one over threads)."""
        n = len(ids)
        key = (table, n, on_miss, lease, dim, dtype)
        shape = self._lent_lookups.get(key)
        if shape is None:
            if len(self._lent_lookups) >= MAX_LOOKUP_SHAPES:
                self._lent_lookups.clear()
            itemsize = WIRE_DTYPES[dtype].itemsize
            shape = self._lent_lookups[key] = _LentLookup(region_bytes(((n,), 8), ((n, dim), itemsize)),
                                                          region_offsets(((n,), 8), ((n, dim), itemsize)), {})
        segment = self.pool.take(shape.nbytes)
        try:
            id_offset, row_offset = shape.offsets
            np.ndarray((n,), np.int64, buffer=segment.shm.buf, offset=id_offset)[...] = ids
            payload = shape.requests.get(segment.name)
            if payload is None:
                if len(shape.requests) >= MAX_LOOKUP_SHAPES:      # segments replaced meanwhile
                    shape.requests.clear()
                payload = shape.requests[segment.name] = pb.SharedLookupRequest(
                    table=table, segment=segment.name, on_miss=on_miss, lease=lease,
                    ids=pb.SharedArray(dtype="int64", shape=[n], offset=id_offset),
                    weights=pb.SharedArray(dtype=dtype, shape=[n, dim], offset=row_offset)).SerializeToString()
            self._shared_lookup(lambda: pb.SharedLookupRequest.FromString(payload), payload)
        except BaseException:
            self.pool.retire(segment)            # the server may still be writing into it
            raise
        return self.pool.lend(segment, row_offset, (n, dim), dtype)

    def _lookup(self, table, ids, start, place, on_miss, lease, dim, dtype) -> None:
        """One segment for the whole lookup; pieces of about PIECE_BYTES of rows are asked for up to
        PIECES_AHEAD at a time, so the server gathers piece i+1 while this client copies piece i
        to its place (`place(start, stop, weights, None)`)."""
        n, itemsize = len(ids), WIRE_DTYPES[dtype].itemsize
        step = max(1, PIECE_BYTES // max(1, dim * itemsize))
        with self.pool.lease(region_bytes(((n,), 8), ((n, dim), itemsize))) as segment:
            id_view, id_offset = segment.place((n,), "int64")
            id_view[...] = ids
            rows, row_offset = segment.place((n, dim), dtype)
            rows.flags.writeable = False

            def request(first: int, last: int) -> pb.SharedLookupRequest:
                return pb.SharedLookupRequest(
                    table=table, segment=segment.name, on_miss=on_miss, lease=lease,
                    ids=pb.SharedArray(dtype="int64", shape=[last - first], offset=id_offset + 8 * first),
                    weights=pb.SharedArray(dtype=dtype, shape=[last - first, dim],
                                           offset=row_offset + first * dim * itemsize))

            pieces = [(first, min(n, first + step)) for first in range(0, n, step)] or [(0, 0)]
            if len(pieces) == 1:                 # a blocking call: a future would start grpc's spin thread per call
                self._shared_lookup(lambda: request(0, n))
                place(start, start + n, rows, None)
            else:
                self._lookup_pieces(pieces, request, lambda first, last: place(
                    start + first, start + last, rows[first:last], None))

    def _shared_lookup(self, make: Callable[[], pb.SharedLookupRequest], payload: bytes | None = None) -> None:
        """One SharedLookup, the request `make()` (serialized: `payload`, if already made): on the
        doorbell when the server named one, else (or when it cannot be rung) over gRPC."""
        doorbell = self.doorbell
        if doorbell is not None:
            try:
                doorbell.call(make().SerializeToString() if payload is None else payload, self.timeout)
                return
            except NotRung:
                if self.doorbell is doorbell:    # the server stopped or restarted: gRPC until an attach names one
                    self.doorbell = None
                doorbell.close()
        with _rpc():
            self._calls["SharedLookup"](make(), timeout=self.timeout)

    def _lookup_pieces(self, pieces: list[tuple[int, int]], request: Callable, placed: Callable) -> None:
        """Every piece asked for, PIECES_AHEAD beyond the one being placed; an error ends the others."""
        waiting: deque = deque()

        def place_oldest() -> None:
            first, last, call = waiting.popleft()
            with _rpc():
                call.result()
            placed(first, last)

        try:
            for first, last in pieces:
                waiting.append((first, last, self._calls["SharedLookup"].future(request(first, last),
                                                                                timeout=self.timeout)))
                if len(waiting) > PIECES_AHEAD:
                    place_oldest()
            while waiting:
                place_oldest()
        finally:
            for _, _, call in waiting:
                call.cancel()

    def update(self, table: str, id_array: np.ndarray, weights: np.ndarray, state: np.ndarray | None,
               scores: np.ndarray | None) -> int:
        arrays = {"ids": id_array, "weights": weights, "state": state, "scores": scores}

        def request(segment, key: str) -> pb.SharedUpdateRequest:
            specs = {field: segment.put(array, field) for field, array in arrays.items() if array is not None}
            return pb.SharedUpdateRequest(table=table, segment=segment.name, idempotency_key=key, **specs)

        return self._write("SharedUpdate", arrays.values(), request)

    def push_gradients(self, table: str, id_array: np.ndarray, grad_array: np.ndarray, positions: np.ndarray | None,
                       owner: str, score_array: np.ndarray | None) -> int:
        if positions is not None:
            id_array, grad_array = take_rows(id_array, positions), take_rows(grad_array, positions)
            score_array = None if score_array is None else score_array[positions]
        arrays = {"ids": id_array, "grads": grad_array, "scores": score_array}

        def request(segment, key: str) -> pb.SharedApplyGradientsRequest:
            specs = {field: segment.put(array, field) for field, array in arrays.items() if array is not None}
            return pb.SharedApplyGradientsRequest(table=table, segment=segment.name, owner=owner,
                                                  idempotency_key=key, **specs)

        return self._write("SharedApplyGradients", arrays.values(), request)

    def step_request(self, gradients: dict[str, tuple[np.ndarray, Any]], lookups: dict[str, np.ndarray],
                     prefetches: dict[str, np.ndarray], message: pb.TrainRequest, device=None
                     ) -> tuple[Segment, dict, Any]:
        """Put one Train step's gradients (checked ids, [n, dim] rows: NumPy, or CUDA tensors), lookup
        and prefetch ids in a segment of its own and describe them in `message`; returns the segment
        (held until the step's answer: given back once answered, retired if not), per looked-up table
        where its rows will be written (the SharedArray of a segment region, or a GPU buffer's tensor
        view), and the GPU buffer the step holds (or None).
        With `device` (a CUDA device) a GPU table's rows are written into a GPU buffer there (CUDA IPC)
        and its CUDA gradients read from one, when the server can open it."""
        gpu_grads, gpu_rows = self._gpu_parts(gradients, lookups, device)
        gradients = {table: (ids, grads if table in gpu_grads else as_rows(grads, len(ids), f"gradients[{table!r}]"))
                     for table, (ids, grads) in gradients.items()}
        shapes = {table: self._table(table) for table in lookups}
        host_rows = [table for table in lookups if table not in gpu_rows]
        nbytes = region_bytes(*((ids.shape, 8) for ids, _ in gradients.values()),
                              *((g.shape, g.itemsize) for table, (_, g) in gradients.items() if table not in gpu_grads),
                              *(((len(ids),), 8) for ids in (*lookups.values(), *prefetches.values())),
                              *(((len(lookups[t]), shapes[t][0]), WIRE_DTYPES[shapes[t][1]].itemsize)
                                for t in host_rows))
        segment, buffer = self.pool.take(nbytes), None
        try:
            if gpu_grads or gpu_rows:
                buffer = self.device_pool(device).take(region_bytes(
                    *((tuple(g.shape), 4) for table, (_, g) in gradients.items() if table in gpu_grads),
                    *(((len(lookups[t]), shapes[t][0]), WIRE_DTYPES[shapes[t][1]].itemsize) for t in gpu_rows)))
            message.segment = segment.name
            for table, (ids, grads) in gradients.items():
                if table in gpu_grads:
                    view, spec = buffer.array(tuple(grads.shape), "float32")
                    view.copy_(grads)
                else:
                    spec = segment.put(grads, f"gradients[{table!r}]")
                message.gradients.add(table=table, shared_ids=segment.put(ids, f"gradients[{table!r}].ids"),
                                      shared_values=spec)
            if buffer is not None:
                import torch

                torch.cuda.current_stream(buffer.device).synchronize()   # gradients written before the server reads
            places = {}
            for table, ids in lookups.items():
                id_spec = segment.put(ids, f"lookups[{table!r}]")
                shape = (len(ids), shapes[table][0])
                view, row_spec = (buffer if table in gpu_rows else segment).array(shape, shapes[table][1])
                places[table] = view if table in gpu_rows else row_spec     # the segment's rows: lent on answer
                message.lookups.add(table=table, shared_ids=id_spec, shared_values=row_spec)
            for table, ids in prefetches.items():
                message.prefetches.add(table=table, shared_ids=segment.put(ids, f"prefetches[{table!r}]"))
        except BaseException:
            self.pool.give(segment)           # nothing was sent: the server never saw them
            if buffer is not None:
                self.device_pool(device).give(buffer)
            raise
        return segment, places, buffer

    def forget_tables(self) -> None:
        """Read table shapes afresh (after a failed call: a table may have been re-created)."""
        self._tables.clear()
        self._gpu_tables.clear()

    def _table(self, table: str) -> tuple[int, str]:
        if table not in self._tables:
            config = self._describe(table)
            self._tables[table] = (config["dim"], config["dtype"] or "float32")
            self._gpu_tables[table] = config["cache"]["device"].startswith("cuda")
        return self._tables[table]

    def _write(self, method: str, arrays, request: Callable) -> int:
        """One write under a fresh idempotency key, retried with it while the server is unavailable
        (as the network path's streamed writes are); the segment is held until the answer."""
        key = uuid.uuid4().hex
        nbytes = region_bytes(*((a.shape, a.itemsize) for a in arrays if a is not None))
        with self.pool.lease(nbytes) as segment:
            return self._send_retried(method, request(segment, key))

    def _send_retried(self, method: str, message) -> int:
        """A write's rows count; the same message again while the server is unavailable (its
        idempotency key keeps a retry from applying twice)."""
        for attempt in range(RETRIES + 1):
            try:
                with _rpc():
                    return self._calls[method](message, timeout=self.timeout).rows
            except UnavailableError:
                if attempt == RETRIES:
                    raise
            time.sleep(BACKOFF_SECONDS * (attempt + 1))
        raise AssertionError("unreachable")

    def _with_table(self, table: str, call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args, dim, dtype)` with the table's shape; once more with a fresh one if the table
        was re-created with another shape since it was read."""
        for attempt in range(2):
            try:
                return call(*args, *self._table(table))
            except KVStoreError as exc:
                self._tables.pop(table, None)
                if attempt or not (isinstance(exc, InvalidArgumentError) and exc.message.startswith("weights.")):
                    raise

    # --- segments --------------------------------------------------------------------

    def _attach(self, segment: Segment, token: bytes) -> str:
        with _rpc():
            answer = self._calls["AttachSegment"](pb.AttachSegmentRequest(segment=segment.name, token=token),
                                                  timeout=self.timeout)
        if answer.attached and answer.doorbell and (self.doorbell is None or self.doorbell.name != answer.doorbell):
            self.doorbell = DoorbellClient(answer.doorbell, self._token)
        return "" if answer.attached else answer.reason or "the server did not attach the segment"

    def _detach(self, name: str) -> None:
        with _rpc():
            self._calls["DetachSegment"](pb.DetachSegmentRequest(segment=name), timeout=self.timeout)
