"""The training stream: a mixin of the servicer, one ordered stream per trainer.

A trainer sends each step's gradients and the next step's lookups on one stream,
without waiting for answers; the server runs the steps strictly in the order sent.
So a lookup always sees every earlier step's gradients (the results are those of a
loop that waits for each call), while the client overlaps its own work with the
round trip. One step is one message (or several, for large batches); it is
validated whole before anything changes, its gradients are applied, then its
lookups are read. An open stream holds no thread: each step runs in the store's
executor and the stream waits for the next step as a coroutine.
A client on the server's machine may put a step's ids and gradients in its shared-memory
segment and name where each lookup's rows go (same_host_service.py): those rows are
written there before the step's answer (on the event loop when cached, as below; else in
the executor), and are not in the answer.
Gradients and lookup rows may also lie in the client's GPU buffers (CUDA IPC): a step
keeps the buffers it names open until it has run, even if the stream is cancelled.
A small step whose rows are all cached runs on the event loop itself when nothing in it
would wait (`_step_inline`), as cached lookups do: two thread hand-offs fewer per step.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
from kvstore_proto.tensors import decode_ids, decode_tensor, train_response, train_response_into
from kvstore_proto.v1 import kvstore_pb2 as pb

from kvstore import Store
from kvstore.dtypes import weight_dtype
from kvstore.errors import InvalidArgument

from .config import ServerConfig
from .data_budget import DataBudget
from .messages import concat, on_miss_name
from .request_budget import BufferedRequest, RequestMemory
from .rpc import StoreWork
from .same_host_service import shared_piece_ids, to_the_end
from .segments import Segment

RESPONSE_BYTES = 4 << 20      # rows per response message: gRPC streams 1-4 MiB messages best


@dataclass
class _Step:
    """The pieces of one step received so far, per table in order of first appearance."""

    gradients: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = field(default_factory=dict)
    lookups: dict[str, list[np.ndarray]] = field(default_factory=dict)
    prefetches: dict[str, list[np.ndarray]] = field(default_factory=dict)
    on_miss: str = "init_insert"
    rows: int = 0
    destinations: dict[str, list[np.ndarray | None]] = field(default_factory=dict)   # same-host: rows' places
    buffers: ExitStack = field(default_factory=ExitStack)     # GPU buffers the step writes, open until it ran
    # how far the step has run (it may begin on the event loop and go on in a store thread)
    batches: dict[str, tuple[np.ndarray, np.ndarray]] | None = None   # gradients per table, once checked
    stepped: dict[str, int] = field(default_factory=dict)     # tables stepped so far: unique rows of each
    answer: tuple[bytes, list[np.ndarray]] | None = None      # the one-message answer and its row views
    looked_up: list[tuple[str, np.ndarray]] = field(default_factory=list)   # rows in the answer so far
    placed: set[str] = field(default_factory=set)            # tables whose rows are in the segment so far


class TrainingRPCs:
    """Train: ordered steps of gradients then lookups over many tables, one stream per trainer."""

    store: Store
    config: ServerConfig
    work: StoreWork
    request_memory: RequestMemory
    data_budget: DataBudget

    async def Train(self, requests, context):
        with self.request_memory.hold(context) as held:    # a step's messages count until it has run
            step = _Step()
            try:
                async for request in held.chunks(requests, requests):
                    self._add_pieces(step, request, self.train_segment(request, context), held, context)
                    if request.more:
                        continue
                    responses = self._step_inline(step)
                    if responses is None:
                        responses = await to_the_end(self.work(self._run_step, step))
                    step.buffers.close()
                    for response in responses:
                        yield response
                    held.release()
                    if step.prefetches:                          # while the answer travels; the next step waits
                        await self.work(self._prefetch, step)
                    step = _Step()
            finally:
                step.buffers.close()

    def _add_pieces(self, step: _Step, request: pb.TrainRequest, segment: Segment | None,
                    held: BufferedRequest, context) -> None:
        step.on_miss = on_miss_name(request.on_miss)
        if step.on_miss == "error":
            raise InvalidArgument("on_miss: 'error' is not accepted in Train (the step's gradients would "
                                  "already be applied when a lookup fails); use Lookup")
        for index, piece in enumerate(request.gradients):
            where = f"gradients[{index}]"
            ids = self._piece_ids(step, segment, piece, where)
            dim = self.store.describe_table(piece.table).dim          # NOT_FOUND before buffering
            if _shared(segment, piece, where, "shared_values"):
                grads = self.shared_input(held, segment, piece.shared_values, f"{where}.shared_values",
                                          (len(ids), dim), "float32", context, np.float32)
            else:
                grads = decode_tensor(piece.values, f"{where}.values", "float32")
            if grads.shape != (len(ids), dim):
                raise InvalidArgument(f"{where}.values: expected shape ({len(ids)}, {dim}) for {len(ids)} ids of "
                                      f"table {piece.table!r}, got {grads.shape}")
            if grads.dtype.kind != "f":
                raise InvalidArgument(f"{where}.values: must be floating point, got {grads.dtype}")
            id_parts, grad_parts = step.gradients.setdefault(piece.table, ([], []))
            id_parts.append(ids)
            grad_parts.append(grads)
        for kind, pieces, into in (("lookups", request.lookups, step.lookups),
                                   ("prefetches", request.prefetches, step.prefetches)):
            for index, piece in enumerate(pieces):
                where = f"{kind}[{index}]"
                ids = self._piece_ids(step, segment, piece, where)
                config = self.store.describe_table(piece.table)
                if kind == "lookups":
                    self._add_destination(step, segment, piece, where, len(ids), config, context)
                into.setdefault(piece.table, []).append(ids)

    def _piece_ids(self, step: _Step, segment: Segment | None, piece: pb.TableRows, where: str) -> np.ndarray:
        if _shared(segment, piece, where, "shared_ids"):
            ids = shared_piece_ids(segment, piece, where)
        else:
            ids = decode_ids(piece.ids, f"{where}.ids")
        step.rows = self._count_rows(step.rows, len(ids))
        return ids

    def _add_destination(self, step: _Step, segment: Segment | None, piece: pb.TableRows, where: str, n: int,
                         config, context) -> None:
        """Where a lookup piece's rows go: into the segment or a GPU buffer, or (None) into the answer;
        one way per table."""
        rows = None
        if _shared(segment, piece, where, "shared_values"):
            rows = self.shared_output(step.buffers, segment, piece.shared_values, f"{where}.shared_values",
                                      (n, config.dim), config.dtype, context)
        parts = step.destinations.setdefault(piece.table, [])
        if parts and _kind(parts[0]) != _kind(rows):
            raise InvalidArgument(f"{where}.shared_values: every lookup piece of table {piece.table!r} in a step "
                                  "must send its rows the same way (the answer, the segment or a GPU buffer)")
        parts.append(rows)

    def _step_inline(self, step: _Step) -> list[bytes] | None:
        """The step's answer, run here on the event loop, when none of it waits: gradients and
        rows of at most `inline_lookup_bytes`, every id cached in the host memory of a write_back
        table whose lock is free now (`Store.apply_gradients_if_cached`, `lookup_if_cached`),
        one answer message, no rows to place in a GPU buffer, the data budget not
        exhausted. Else None, with what could run done and recorded in `step`: a store thread
        goes on from there, so each part of the step still runs once and in order."""
        if self.data_budget.exhausted or any(_kind(place) == "device" for places in step.destinations.values()
                                             for place in places):
            return None
        size = sum(grads.nbytes for _, parts in step.gradients.values() for grads in parts)
        for table, parts in step.lookups.items():
            config = self.store.describe_table(table)
            size += sum(len(ids) for ids in parts) * config.dim * weight_dtype(config.dtype).itemsize
        if size > self.config.inline_lookup_bytes:
            return None
        return self._run_step(step, inline=True)

    def _run_step(self, step: _Step, inline: bool = False) -> list[bytes] | None:
        """Validate, step, look up: the step's answer, in messages. `inline`: only what needs no
        waiting, returning None where the rest must go to a store thread (`_step_inline`)."""
        if step.batches is None:
            gradients = {table: (concat(ids), concat(grads)) for table, (ids, grads) in step.gradients.items()}
            for table, (_, grads) in list(gradients.items())[1:]:
                # the store checks the table it steps before changing it; the others are checked
                # here first, so a bad table anywhere in the step changes no table
                if not self.store.describe_table(table).allow_nonfinite and not np.isfinite(grads).all():
                    raise InvalidArgument(f"gradients: contain NaN or Inf for table {table!r} (it does not allow them)")
            self._check_data_budget(step, gradients)
            step.batches = gradients
        for table, (ids, grads) in step.batches.items():
            if table not in step.stepped:
                stepped = (self.store.apply_gradients_if_cached(table, ids, grads) if inline
                           else self.store.apply_gradients(table, ids, grads))
                if stepped is None:
                    return None
                step.stepped[table] = stepped
        answered = []
        for table, parts in step.lookups.items():
            places = step.destinations.get(table)
            if places and _kind(places[0]) == "device":
                self._rows_to_gpu_buffers(table, parts, places, step.on_miss)
            elif places and places[0] is not None:           # same-host: into the client's segment, not the answer
                if table not in step.placed and not self._rows_to_segment(table, parts, places, step.on_miss, inline):
                    return None
                step.placed.add(table)
            else:
                answered.append((table, concat(parts)))
        return self._answer(step, answered, inline)

    def _answer(self, step: _Step, answered: list[tuple[str, np.ndarray]], inline: bool) -> list[bytes] | None:
        """The step's answer with the rows of `answered` (table, ids): one message with the rows
        gathered straight into it when they fit in one (`train_response_into`), else messages of
        about RESPONSE_BYTES, each built with one copy of its rows. `inline`: None where a lookup
        would wait (those before it are kept in `step`)."""
        if step.answer is None:
            shapes = []
            for table, ids in answered:
                config = self.store.describe_table(table)
                shapes.append((table, len(ids), config.dim, weight_dtype(config.dtype)))
            if sum(n * dim * dtype.itemsize for _, n, dim, dtype in shapes) <= RESPONSE_BYTES:
                step.answer = train_response_into(shapes, step.stepped)
            if step.answer is None:
                if inline:
                    return None
                return list(_responses([(table, self.store.lookup(table, ids, step.on_miss).weights)
                                        for table, ids in answered], step.stepped))
        message, views = step.answer
        for (table, ids), view in list(zip(answered, views, strict=True))[len(step.looked_up):]:
            if inline:
                result = self.store.lookup_if_cached(table, ids, False, view)
                if result is None:
                    return None
            else:
                result = self.store.lookup(table, ids, step.on_miss, out=view)
            step.looked_up.append((table, result.weights))
        if all(weights is view for (_, weights), view in zip(step.looked_up, views, strict=True)):
            return [message]
        return list(_responses(step.looked_up, step.stepped))    # a table re-created meanwhile with another shape

    def _rows_to_segment(self, table: str, parts: list[np.ndarray], places: list[np.ndarray], on_miss: str,
                         inline: bool) -> bool:
        """Each part's rows into its place in the client's segment. `inline`: only when every part's
        rows are cached and the table's lock is free (False, some parts maybe written: the store
        thread writes them all again)."""
        if inline:
            return all(self.store.lookup_if_cached(table, ids, False, place) is not None
                       for ids, place in zip(parts, places, strict=True))
        weights = self.store.lookup(table, concat(parts), on_miss).weights
        bounds = np.cumsum([0] + [len(part) for part in parts])
        for place, start, stop in zip(places, bounds[:-1], bounds[1:], strict=True):
            place[...] = weights[start:stop]
        return True

    def _rows_to_gpu_buffers(self, table: str, parts: list[np.ndarray], places: list, on_miss: str) -> None:
        """Each part's rows into its place in a client's GPU buffer: a GPU table's cached rows
        gathered there, others looked up on the host and copied up; finished before the answer."""
        for ids, place in zip(parts, places, strict=True):
            self._lookup_and_upload(table, ids, on_miss, place)

    def _check_data_budget(self, step: _Step, gradients: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Past the disk budget a step that would create rows is refused before any table changes."""
        for table, (ids, _) in gradients.items():
            self.data_budget.require_present(table, ids, "a gradient step on ids the table lacks")
        if step.on_miss == "init_insert":
            for table, parts in step.lookups.items():
                self.data_budget.require_present(table, concat(parts), "a lookup with on_miss init_insert of ids "
                                                                       "the table lacks")

    def _prefetch(self, step: _Step) -> None:
        if self.data_budget.exhausted:          # a hint that would store missing rows: skipped past the budget
            return
        for table, parts in step.prefetches.items():
            self.store.prefetch(table, concat(parts))


def _shared(segment: Segment | None, piece: pb.TableRows, where: str, field_name: str) -> bool:
    """Whether a piece's `field_name` lies in the segment (which the message must then name)."""
    if not piece.HasField(field_name):
        return False
    if segment is None:
        raise InvalidArgument(f"{where}.{field_name}: a shared array needs the message's segment")
    return True


def _kind(place) -> str:
    """How a lookup piece's rows travel: in the answer, into the segment, or into a GPU buffer."""
    return "answer" if place is None else "segment" if isinstance(place, np.ndarray) else "device"


def _responses(rows: list[tuple[str, np.ndarray]], stepped: dict[str, int]) -> Iterator[bytes]:
    """The step's answer in serialized messages of about RESPONSE_BYTES, each built with one copy of
    its rows (`train_response`); each table's rows in order."""
    parts: list[tuple[str, np.ndarray]] = []
    size, first = 0, True
    for table, weights in rows:
        step = max(1, RESPONSE_BYTES // max(1, weights[:1].nbytes))
        for start in range(0, max(1, len(weights)), step):
            part = weights[start:start + step]
            if size and size + part.nbytes > RESPONSE_BYTES:
                yield train_response(parts, stepped if first else None, more=True)
                parts, size, first = [], 0, False
            parts.append((table, part))
            size += part.nbytes
    yield train_response(parts, stepped if first else None)
