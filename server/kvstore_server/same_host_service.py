"""The same-host path: a mixin of the servicer (AttachSegment, SharedLookup, SharedUpdate, ...).

A client on this machine puts ids and rows in its own shared-memory segment
(segments.py); these calls carry where they lie, and the answers carry counts. The
semantics are those of Lookup, Update and ApplyGradients exactly, through the same
store calls; only the bytes travel differently:
- inputs (ids, weights, gradients, state, scores) are copied out of the segment
  before anything is checked or applied, so a client writing its segment during the
  call cannot slip unchecked values past validation;
- a lookup writes its rows into the client's region, chunk by chunk, and answers
  only after the last byte is written. A call the client abandons (cancelled, timed
  out) may still be writing when the client stops waiting: the client never reuses
  a region whose call did not answer (kvstore_client/shared_memory.py retires it).
Only peers on this machine (loopback or unix socket) may use it, and only while the
server's `same_host` setting is on; otherwise FAILED_PRECONDITION (AttachSegment
answers `attached: false`, so the client takes the network path).

A client whose rows live on a GPU may also name regions of its GPU buffers
(device_buffers.py, CUDA IPC) for a lookup's rows, an update's weights and the
gradients: a GPU table's cached rows are gathered straight into the client's
memory, and every device write is finished before the answer.
"""
from __future__ import annotations

import asyncio
from contextlib import ExitStack
from typing import NamedTuple

import numpy as np
from kvstore_proto.v1 import kvstore_pb2 as pb

from kvstore import Store
from kvstore.dtypes import weight_dtype
from kvstore.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from kvstore.table import Table

from .data_budget import DataBudget
from .device_buffers import DeviceBuffers, device_region, upload
from .health_watch import peer_address
from .idempotency import RecentWrites
from .messages import on_miss_name
from .races import on_table
from .request_budget import BufferedRequest, RequestMemory
from .security import is_loopback
from .segments import Segment, Segments, region

LOOKUP_PIECE_BYTES = 4 << 20      # rows of a lookup into a GPU buffer per store call (each may go on the loop)
STORE_PIECE_BYTES = 16 << 20      # rows a store thread looks up into a segment per call: bounds missing rows' memory


def _is_local(peer: str) -> bool:
    return peer.startswith("unix") or is_loopback(peer_address(peer))


class SameHostRPCs:
    """Lookups, updates and gradient steps whose rows move through the client's shared memory."""

    store: Store
    data_budget: DataBudget
    request_memory: RequestMemory
    recent: RecentWrites

    def __init__(self, enabled: bool):
        self.segments = Segments() if enabled else None
        self.device_buffers = DeviceBuffers() if enabled else None
        self.doorbell = ""                   # the Unix socket that also takes SharedLookup (doorbell.py), if any

    async def AttachSegment(self, request, context):
        """Whether the same-host path works for this client and segment (never an error for 'no')."""
        if self.segments is None:
            return pb.AttachSegmentResponse(reason="the same-host path is off on this server (same_host: false)")
        if not _is_local(context.peer()):
            return pb.AttachSegmentResponse(reason="the client is not on the server's machine")
        reason = self.segments.attach(request.segment, request.token)
        return pb.AttachSegmentResponse(attached=not reason, reason=reason, doorbell="" if reason else self.doorbell)

    async def DetachSegment(self, request, context):
        if self.segments is not None:
            self.segments.detach(request.segment)
            await self.device_buffers.detach(request.segment)
        return pb.DetachSegmentResponse()

    async def AttachDeviceBuffer(self, request, context):
        """Whether this server can read and write the client's GPU buffer (never an error for 'no')."""
        if self.device_buffers is None:
            return pb.AttachSegmentResponse(reason="the same-host path is off on this server (same_host: false)")
        if not _is_local(context.peer()):
            return pb.AttachSegmentResponse(reason="the client is not on the server's machine")
        reason = await self.device_buffers.attach(request.buffer, request.handle, request.size, request.device_uuid,
                                                  request.token)
        return pb.AttachSegmentResponse(attached=not reason, reason=reason)

    def train_segment(self, request: pb.TrainRequest, context) -> Segment | None:
        """The segment a Train message's shared arrays lie in, or None when it names none."""
        return self._segment(request.segment, context) if request.segment else None

    def _segment(self, name: str, context) -> Segment:
        if self.segments is None:
            raise FailedPrecondition("segment: the same-host path is off on this server (same_host: false); "
                                     "use Lookup, Update and ApplyGradients")
        if not _is_local(context.peer()):
            raise FailedPrecondition("segment: the same-host path needs a client on the server's machine")
        return self.segments.get(name)

    # --- lookup ------------------------------------------------------------------------

    def shared_lookup_now(self, request, context) -> int | None:
        """SharedLookup done in the calling thread, which may block (a doorbell connection's own),
        when it needs nothing else: no lease to renew, rows into the segment, and every one cached
        (a piece of STORE_PIECE_BYTES at a time, each gathered straight into the segment once the
        table lock is free); the rows written. None when it does: SharedLookup then takes the call
        whole (pieces written here are written again). A bad request raises as SharedLookup's
        checks do. `context.plan` keeps what a request was checked into (`_RepeatedLookup`), so a
        loop's same request again is not checked again while its segment and table are the same."""
        plan = context.plan
        if (plan is None or plan.request is not request or self.segments.get(request.segment) is not plan.segment
                or self.store.table(request.table) is not plan.table):
            plan = context.plan = self._plan_lookup(request, context)
            if plan is None:
                return None
        ids = plan.ids.copy()                         # the server's own (the client may write its segment)
        for at in plan.pieces:
            if on_table(self.store, request.table, self.store.lookup_if_cached, request.table, ids[at], False,
                        plan.weights[at], True, before=plan.table.family) is None:
                return None
        return len(ids)

    def _plan_lookup(self, request, context) -> _RepeatedLookup | None:
        """`request`'s checks as SharedLookup makes them, and the regions it names; None when the
        lookup needs the event loop (a lease, a GPU buffer, state)."""
        if request.lease or request.weights.device_buffer or request.HasField("state"):
            return None
        segment = self._segment(request.segment, context)
        ids = self._shared_ids_region(segment, request, "ids")
        found = self.store.table(request.table)        # NOT_FOUND as describe_table's
        config = found.config
        on_miss_name(request.on_miss)                 # checked as SharedLookup checks it
        weights = region(segment, request.weights, "weights", (len(ids), config.dim), config.dtype, exact=True)
        return _RepeatedLookup(request, segment, ids, found, weights, _pieces(len(ids), weights[:1].nbytes))

    async def SharedLookup(self, request, context):
        segment = self._segment(request.segment, context)
        ids = self._shared_ids(segment, request, "ids")
        config = self.store.describe_table(request.table)
        if request.lease:
            self.leases.renew_if_live(request.lease)
        on_miss = on_miss_name(request.on_miss)
        if on_miss == "init_insert" and self.config.replica_of:
            on_miss = "init"                          # a replica never stores rows (as its Lookup)
        n = len(ids)
        if request.weights.device_buffer:
            if request.HasField("state"):
                raise InvalidArgument("state: a lookup into a GPU buffer gives weights only; ask for state "
                                      "through the segment")
            with self._device_buffer(request.weights, "weights", context) as buffer:
                weights = device_region(buffer, request.weights, "weights", (n, config.dim), config.dtype, exact=True)
                await self._lookup_to_device(request.table, ids, on_miss, weights)
            return pb.SharedLookupResponse(rows=n)
        weights = region(segment, request.weights, "weights", (n, config.dim), config.dtype, exact=True)
        state = None
        if request.HasField("state"):
            state = region(segment, request.state, "state", (n, config.state_dim), "float32", exact=True)
        if not self._lookup_cached_into(request.table, ids, weights, state):
            await self.on_table(request.table, self._lookup_into, request.table, ids, on_miss, weights, state)
        return pb.SharedLookupResponse(rows=n)

    def _lookup_cached_into(self, table: str, ids: np.ndarray, weights: np.ndarray, state: np.ndarray | None) -> bool:
        """On the event loop, when Lookup's inline path would serve it there (the weights gathered
        straight into the segment)."""
        result = self._inline_lookup(table, ids, state is not None,
                                     weights.nbytes + (0 if state is None else state.nbytes), weights)
        if result is None:
            return False
        _write(result, weights, state)
        return True

    def _lookup_into(self, table: str, ids: np.ndarray, on_miss: str, weights: np.ndarray,
                     state: np.ndarray | None) -> None:
        """In a store thread: rows of `ids` into the segment, a piece at a time, the cached ones
        gathered straight there (a large piece split over threads, see `host_kernels`); only the
        missing rows of a piece (and its state) are held in memory before they are written."""
        row_bytes = weights[:1].nbytes + (0 if state is None else state[:1].nbytes)
        for at in _pieces(len(ids), row_bytes):
            _write(self.data_budget.lookup(table, ids[at], on_miss, state is not None, weights[at]), weights[at],
                   None if state is None else state[at])

    async def _lookup_to_device(self, table: str, ids: np.ndarray, on_miss: str, weights) -> None:
        """Rows of `ids` into `weights`, a region of a client's GPU buffer: a GPU table's cached rows
        gathered there on the event loop, the rest looked up in the store threads and copied up."""
        step = max(1, LOOKUP_PIECE_BYTES // max(1, weights.itemsize * weights.shape[1]))
        for start in range(0, len(ids), step):
            part, piece = weights[start:start + step], ids[start:start + step]
            if self._inline_lookup(table, piece, False, part.nbytes, part) is None:
                await to_the_end(self.on_table(table, self._lookup_and_upload, table, piece, on_miss, part))

    def _lookup_and_upload(self, table: str, ids: np.ndarray, on_miss: str, out) -> None:
        """In a store thread: `ids`' rows into `out` (a client's GPU buffer), gathered there when all
        are cached, else looked up on the host and copied up; finished before this returns."""
        if self.store.lookup_if_cached(table, ids, False, out, wait=True) is not None:     # gathered into `out`
            return
        upload(out, self.data_budget.lookup(table, ids, on_miss, False).weights)

    # --- writes ------------------------------------------------------------------------

    async def SharedUpdate(self, request, context):
        segment = self._segment(request.segment, context)
        ids = self._shared_ids(segment, request, "ids")
        config = self.store.describe_table(request.table)
        n = len(ids)
        with self.request_memory.hold(context) as held:
            weights = self.shared_input(held, segment, request.weights, "weights", (n, config.dim), config.dtype,
                                        context)
            state = scores = None
            if request.HasField("state"):
                state = copied(held, region(segment, request.state, "state", (n, None), "float32"))
            if request.HasField("scores"):
                scores = copied(held, region(segment, request.scores, "scores", (n,)))

            async def commit():
                self.data_budget.check("an update")
                rows = await self.on_table(request.table, self.store.update, request.table, ids, weights, state,
                                           scores)
                return pb.UpdateResponse(rows=rows)

            return await self.recent.once("Update", request.idempotency_key, commit)

    async def SharedApplyGradients(self, request, context):
        segment = self._segment(request.segment, context)
        ids = self._shared_ids(segment, request, "ids")
        dim = self.store.describe_table(request.table).dim
        n = len(ids)
        with self.request_memory.hold(context) as held:
            grads = self.shared_input(held, segment, request.grads, "grads", (n, dim), "float32", context, np.float32)
            scores = None
            if request.HasField("scores"):
                scores = copied(held, region(segment, request.scores, "scores", (n,)))
            if request.owner:
                self.leases.renew_if_live(request.owner)

            async def commit():
                stepped = await self.on_table(request.table, self.data_budget.apply_gradients, request.table, ids,
                                              grads, request.owner or None, scores)
                return pb.ApplyGradientsResponse(rows=stepped)

            return await self.recent.once("ApplyGradients", request.idempotency_key, commit)

    def shared_input(self, held: BufferedRequest, segment: Segment, spec: pb.SharedArray, field: str, shape: tuple,
                     dtype: str, context, convert=None) -> np.ndarray:
        """The server's own host copy of an input array, from the segment or the client's GPU buffer."""
        if not spec.device_buffer:
            return copied(held, region(segment, spec, field, shape, dtype), convert)
        with self._device_buffer(spec, field, context) as buffer:
            view = device_region(buffer, spec, field, shape, dtype)
            held.charge(view.size * np.dtype(convert or view.dtype).itemsize)
            with view.device:
                host = view.get()
            if spec.dtype == "bfloat16":
                host = host.view(weight_dtype("bfloat16"))
            return host.astype(convert, copy=False) if convert else host

    def shared_output(self, held_buffers: ExitStack, segment: Segment, spec: pb.SharedArray, field: str,
                      shape: tuple, dtype: str, context):
        """Where a Train lookup's rows go: a view of the segment, or of a client's GPU buffer kept
        open in `held_buffers` until the step has run."""
        if not spec.device_buffer:
            return region(segment, spec, field, shape, dtype, exact=True)
        buffer = held_buffers.enter_context(self._device_buffer(spec, field, context))
        return device_region(buffer, spec, field, shape, dtype, exact=True)

    def _device_buffer(self, spec: pb.SharedArray, field: str, context):
        if not _is_local(context.peer()):       # as _segment: checked again for every call
            raise FailedPrecondition("segment: the same-host path needs a client on the server's machine")
        return self.device_buffers.using(spec.device_buffer, field)

    def _shared_ids(self, segment: Segment, request, field: str) -> np.ndarray:
        """A private copy of the request's ids (the client may write its segment meanwhile)."""
        return self._shared_ids_region(segment, request, field).copy()

    def _shared_ids_region(self, segment: Segment, request, field: str) -> np.ndarray:
        """The region of the request's ids, checked (copy it before use)."""
        if not request.HasField(field):
            raise InvalidArgument(f"{field}: missing (a shared array of int64 ids)")
        view = region(segment, getattr(request, field), field, (None,), "int64", exact=True)
        if len(view) > self.config.max_request_rows:
            raise ResourceExhausted(f"{field}: {len(view)} rows in one call exceed the server limit of "
                                    f"{self.config.max_request_rows} (max_request_rows); split the batch")
        return view


class _RepeatedLookup(NamedTuple):
    """What a doorbell connection's SharedLookup request was checked into: valid while its
    segment is still attached as this one and its table is still this one (not dropped or
    created again, perhaps with another shape)."""
    request: pb.SharedLookupRequest
    segment: Segment
    ids: np.ndarray                   # the ids' region in the segment
    table: Table
    weights: np.ndarray               # where the rows go in the segment
    pieces: list[slice]


def _pieces(n: int, row_bytes: int) -> list[slice]:
    """The rows of a lookup into a segment, STORE_PIECE_BYTES at a time."""
    step = max(1, STORE_PIECE_BYTES // max(1, row_bytes))
    return [slice(start, start + step) for start in range(0, n, step)]


def shared_piece_ids(segment: Segment, piece: pb.TableRows, where: str) -> np.ndarray:
    """A Train piece's ids from the segment, as the server's own copy."""
    return region(segment, piece.shared_ids, f"{where}.shared_ids", (None,), "int64", exact=True).copy()


def copied(held: BufferedRequest, view: np.ndarray, dtype=None) -> np.ndarray:
    """The server's own copy of a region, charged to the call's request memory (before it is made)."""
    dtype = np.dtype(dtype or view.dtype)
    held.charge(view.size * dtype.itemsize)
    return np.array(view, dtype=dtype)


async def to_the_end(work):
    """Await `work`; if this call is cancelled meanwhile, wait for it to finish before raising: a
    store thread may still be writing into a client's GPU buffer, which must not be closed under it."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                continue
            except Exception:            # noqa: BLE001 - its outcome no longer has a caller
                break
        raise


def _write(result, weights: np.ndarray, state: np.ndarray | None) -> None:
    if result.weights is not weights:
        weights[...] = result.weights
    if state is not None:
        state[...] = result.state
