"""One ordered stream of training steps to the server (the `Train` RPC).

A step carries gradients for any number of tables and lookups of any number of
tables: one message (or a few, for large batches) each way. The server runs the
steps of a stream in the order they were sent, gradients before lookups, so a
client may send step i's gradients and step i+1's lookups without waiting in
between: the lookups still see the gradients, and results equal those of a loop
that waits for every call. Answers come back in order; `TrainStep.result()`
waits for one.

An error (a bad step, the server going away) fails every step still unanswered
and ends the stream; the next `send` opens a new one.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from kvstore_proto.tensors import (
    TRAIN_PIECES,
    WIRE_DTYPES,
    WireError,
    _varint,
    decode_train_response,
    part_bytes,
    table_rows_field,
)
from kvstore_proto.v1 import kvstore_pb2 as pb

from .arrays import as_ids, as_rows, chunks, cuda_device, is_torch
from .client import ON_MISS, KVStoreClient
from .errors import InternalError, InvalidArgumentError, KVStoreError
from .errors import rpc_errors as _rpc
from .reassembly import Allocate, Place, Reassembly
from .shared_memory import Segment

TRAIN_METHOD = f"/{pb.DESCRIPTOR.services_by_name['EmbeddingStore'].full_name}/Train"


class TrainStep:
    """The server's answer to one step, once it has come."""

    def __init__(self, stream: TrainingStream, lookups: dict[str, int]):
        self._stream = stream
        self.lookups = lookups                  # table -> rows expected
        self.done = False
        self.error: KVStoreError | None = None
        self.stepped: dict[str, int] = {}
        self.rows: dict[str, list[np.ndarray]] = {table: [] for table in lookups}
        self.segment: Segment | None = None     # same-host: the step's shared memory, until answered
        self.buffer = None                       # ... and its GPU buffer (CUDA IPC), if any
        self.places: dict[str, Any] = {}         # ... and where each table's rows are written
        self.lent: set[str] = set()              # tables whose rows are this step's own writable arrays

    def result(self, allocate: Allocate = np.empty) -> tuple[dict[str, int], dict[str, np.ndarray]]:
        """(unique rows stepped per table, looked-up weights per table); raises the step's error.
        The weights are copied once from the answer into arrays made by `allocate(shape, dtype)`
        (pinned host memory for a CUDA model, say). Rows the server wrote into this client's GPU
        memory (a GPU table, `send(device=...)` on the same host) come as CUDA tensors instead."""
        self.wait()
        rows = {}
        for table, n in self.lookups.items():
            written_here = table in self.lent and allocate is np.empty
            if len(self.rows[table]) == 1 and (written_here or is_torch(self.rows[table][0])):
                rows[table] = self.rows[table][0]      # where the server wrote it (the segment, the GPU)
                continue
            result = Reassembly(n, allocate=allocate)
            self.place_rows(table, result.sink())
            rows[table] = result.result()
        return self.stepped, rows

    def wait(self) -> None:
        """Wait for the answer; raises the step's error."""
        self._stream._wait(self)
        if self.error is not None:
            raise self.error

    def place_rows(self, table: str, place: Place) -> None:
        """Hand the answered rows of `table` to `place(start, stop, weights, None)`, as read-only views."""
        start, expected = 0, self.lookups[table]
        for part in self.rows[table]:
            if part.ndim != 2 or start + len(part) > expected:
                raise InternalError(message=f"train: the answer for table {table!r} has rows of shape {part.shape} "
                                            f"after {start} rows, expected {expected} rows in all")
            place(start, start + len(part), part, None)
            start += len(part)
        if start != expected or not self.rows[table]:
            raise InternalError(message=f"train: the answer for table {table!r} has {start} rows, expected {expected}")


class TrainingStream:
    def __init__(self, client: KVStoreClient):
        self.client = client
        self._lock = threading.Lock()            # sending, and reading answers
        self._pending: deque[TrainStep] = deque()
        self._requests: queue.SimpleQueue | None = None
        self._call = None

    def send(self, gradients: dict[str, tuple[Any, Any]] | None = None, lookups: dict[str, Any] | None = None,
             on_miss: str = "init_insert", prefetches: dict[str, Any] | None = None, device=None) -> TrainStep:
        """Queue one step: `gradients` {table: (ids, grads [n, dim])}, applied first (duplicates
        summed), then `lookups` {table: ids}; `prefetches` {table: ids} are warmed into the
        server's cache after the answer. Returns at once; `.result()` waits for the answer.
        `device`: a CUDA device the looked-up rows are wanted on; on the same-host path a GPU
        table's rows are then written there by the server (CUDA IPC), and CUDA gradients read there."""
        if on_miss not in ON_MISS or on_miss == "error":
            raise InvalidArgumentError(message=f"on_miss: expected init_insert, init or zeros, got {on_miss!r}")
        step = TrainStep(self, {table: len(as_ids(ids)) for table, ids in (lookups or {}).items()})
        if self.client.same_host.usable():
            messages = [self._shared_message(step, gradients or {}, lookups or {}, prefetches or {}, on_miss,
                                             device).SerializeToString()]
        else:
            messages = _step_messages(gradients or {}, {"lookups": lookups or {}, "prefetches": prefetches or {}},
                                      ON_MISS[on_miss], self.client.chunk_bytes)
        with self._lock:
            if self._call is None:
                self._open()
            self._pending.append(step)
            for message in messages:
                self._requests.put(message)
        return step

    def _shared_message(self, step: TrainStep, gradients: dict, lookups: dict, prefetches: dict,
                        on_miss: str, device) -> pb.TrainRequest:
        """The step as one message whose ids and rows lie in a segment (and a GPU buffer) the step
        holds (same-host path)."""
        device = device or cuda_device(*(grads for _, grads in gradients.values()))
        message = pb.TrainRequest(on_miss=ON_MISS[on_miss])
        step.segment, step.places, step.buffer = self.client.same_host.step_request(
            {table: (as_ids(ids), grads) for table, (ids, grads) in gradients.items()},
            {table: as_ids(ids) for table, ids in lookups.items()},
            {table: as_ids(ids) for table, ids in prefetches.items()}, message, device)
        return message

    def flush(self) -> None:
        """Wait until every step sent so far is answered; raises the first error."""
        with self._lock:
            last = self._pending[-1] if self._pending else None
        if last is not None:
            last.result()

    def close(self) -> None:
        """End the stream. With every step answered it ends as a finished call (the server's
        metrics and log say OK); steps still unanswered fail, and the call is cancelled."""
        with self._lock:
            self._end(None, finished=not self._pending)

    def __enter__(self) -> TrainingStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> None:
        requests: queue.SimpleQueue = queue.SimpleQueue()

        def iterate():
            while (message := requests.get()) is not None:
                yield message

        # requests go as bytes built with one copy of the gradients; answers are read in place
        method = self.client._channel.stream_stream(TRAIN_METHOD, request_serializer=None,
                                                    response_deserializer=None)
        self._requests, self._call = requests, method(iterate())

    def _wait(self, step: TrainStep) -> None:
        with self._lock:
            while not step.done:
                self._read_one()

    def _read_one(self) -> None:
        """Read the answer of the oldest unanswered step (call with the lock held)."""
        head = self._pending[0]
        try:
            with _rpc():
                while True:
                    response = next(self._call, None)
                    if response is None:
                        raise InternalError(message="train: the server ended the stream before answering")
                    if not _absorb(head, response):
                        break
        except KVStoreError as exc:
            self._end(exc)
            return
        if head.segment is not None:          # answered: the rows are in place
            in_segment = {table: spec for table, spec in head.places.items() if not is_torch(spec)}
            for table, rows in head.places.items():
                if is_torch(rows):
                    head.rows[table] = [rows.clone()]
            pool = self.client.same_host.pool
            if in_segment and pool.can_lend():           # the rows, over the segment, own it now (no copy)
                lent = pool.lend_regions(
                    head.segment, [(spec.offset, tuple(spec.shape), spec.dtype) for spec in in_segment.values()])
                for table, rows in zip(in_segment, lent, strict=True):
                    head.rows[table] = [rows]
            else:
                for table, spec in in_segment.items():    # copies: many results are held already
                    head.rows[table] = [np.ndarray(tuple(spec.shape), WIRE_DTYPES[spec.dtype],
                                                   buffer=head.segment.shm.buf, offset=spec.offset).copy()]
                pool.give(head.segment)
            head.lent.update(in_segment)
            head.places = {}
            head.segment = None
            if head.buffer is not None:
                _finish_copies(head.buffer.device)             # the clones are made before the buffer is lent
                self.client.same_host.give_buffer(head.buffer)
                head.buffer = None
        head.done = True
        self._pending.popleft()

    def _end(self, error: KVStoreError | None, finished: bool = False) -> None:
        """End the stream; every unanswered step fails with `error` (or as cancelled). `finished`:
        nothing is unanswered, so the requests end and the server is given the client's timeout
        to end the call before it is cancelled."""
        if error is not None:
            self.client.same_host.forget_tables()
        if self._call is not None:
            self._requests.put(None)
            if not (finished and _ends_within(self._call, self.client.timeout)):
                self._call.cancel()
        self._call = self._requests = None
        while self._pending:
            step = self._pending.popleft()
            if step.segment is not None:      # unanswered: the server may still write into it
                step.places = {}
                self.client.same_host.pool.retire(step.segment)
                step.segment = None
            if step.buffer is not None:
                self.client.same_host.retire_buffer(step.buffer)
                step.buffer = None
            step.error = error or InternalError(message="train: the stream was closed before this step's answer")
            step.done = True


def _ends_within(call, seconds: float) -> bool:
    """Whether a call whose requests have ended terminates within `seconds`."""
    ended = threading.Event()
    call.add_done_callback(lambda *_: ended.set())
    return ended.wait(seconds)


def _absorb(step: TrainStep, response: bytes) -> bool:
    """Take one answer message into `step` (its rows as views of the message); whether more follow."""
    try:
        rows, stepped, more = decode_train_response(response)
    except (WireError, ValueError, DecodeError) as exc:
        raise InternalError(message=f"train: malformed answer: {exc}") from None
    step.stepped.update(stepped)
    for table, values in rows:
        if table not in step.rows:
            raise InternalError(message=f"train: the answer has rows of table {table!r}, which was not asked")
        step.rows[table].append(values)
    return more


_FIELDS = {name: number for number, name in TRAIN_PIECES.items()}     # TrainRequest's TableRows fields


def _step_messages(gradients: dict, id_fields: dict[str, dict], on_miss: int, chunk_bytes: int) -> list[bytes]:
    """The serialized messages of one step, each about `chunk_bytes`; all but the last have `more`
    set. Each is joined from its fields' headers and views of the ids and gradients: one copy of
    the rows, where building messages copies them three times. `id_fields`: {"lookups": {table:
    ids}, "prefetches": {table: ids}}."""
    pieces = []                  # (field, table, ids, grads or None)
    for table, (ids, grads) in gradients.items():
        id_array = as_ids(ids)
        grad_array = as_rows(grads, len(id_array), f"gradients[{table!r}]")
        for start, stop in chunks(len(id_array), 8 + grad_array[:1].nbytes, chunk_bytes):
            pieces.append(("gradients", table, id_array[start:stop], grad_array[start:stop]))
    for kind, tables in id_fields.items():
        for table, ids in tables.items():
            id_array = as_ids(ids)
            for start, stop in chunks(len(id_array), 8, chunk_bytes):
                pieces.append((kind, table, id_array[start:stop], None))
    messages: list[list] = [[]]
    size = written = 0           # the message's rows, and its bytes so far (where the next field goes)
    for kind, table, ids, grads in pieces:
        nbytes = ids.nbytes + (0 if grads is None else grads.nbytes)
        if size and size + nbytes > chunk_bytes:
            messages.append([])
            size = written = 0
        field = table_rows_field(_FIELDS[kind], table, ids, grads, written)
        messages[-1] += field
        size += nbytes
        written += part_bytes(field)
    tail = [b"\x18" + _varint(on_miss)] if on_miss else []
    return [b"".join(parts + tail + ([b"\x20\x01"] if index < len(messages) - 1 else []))
            for index, parts in enumerate(messages)]


def _finish_copies(device) -> None:
    import torch

    torch.cuda.current_stream(device).synchronize()
