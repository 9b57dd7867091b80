"""The training stream: a mixin of the servicer, one ordered stream per trainer.

A trainer sends each step's gradients and the next step's lookups on one stream,
without waiting for answers; the server runs the steps strictly in the order sent.
So a lookup always sees every earlier step's gradients (the results are those of a
loop that waits for each call), while the client overlaps its own work with the
round trip. One step is one message (or several, for large batches); it is
validated whole before anything changes, its gradients are applied, then its
lookups are read. An open stream holds no thread: each step runs in the store's
executor and the stream waits for the next step as a coroutine.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from kvstore_proto.tensors import decode_ids, decode_tensor, encode_tensor
from kvstore_proto.v1 import kvstore_pb2 as pb

from kvstore import Store
from kvstore.errors import InvalidArgument

from .data_budget import DataBudget
from .messages import concat, on_miss_name
from .request_budget import RequestMemory
from .rpc import StoreWork

RESPONSE_BYTES = 4 << 20      # rows per response message: gRPC streams 1-4 MiB messages best


@dataclass
class _Step:
    """The pieces of one step received so far, per table in order of first appearance."""

    gradients: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = field(default_factory=dict)
    lookups: dict[str, list[np.ndarray]] = field(default_factory=dict)
    prefetches: dict[str, list[np.ndarray]] = field(default_factory=dict)
    on_miss: str = "init_insert"
    rows: int = 0


class TrainingRPCs:
    """Train: ordered steps of gradients then lookups over many tables, one stream per trainer."""

    store: Store
    work: StoreWork
    request_memory: RequestMemory
    data_budget: DataBudget

    async def Train(self, requests, context):
        with self.request_memory.hold(context) as held:    # a step's messages count until it has run
            step = _Step()
            async for request in held.chunks(requests):
                self._add_pieces(step, request)
                if request.more:
                    continue
                for response in await self.work(self._run_step, step):
                    yield response
                held.release()
                if step.prefetches:                          # while the answer travels; the next step waits
                    await self.work(self._prefetch, step)
                step = _Step()

    def _add_pieces(self, step: _Step, request: pb.TrainRequest) -> None:
        step.on_miss = on_miss_name(request.on_miss)
        if step.on_miss == "error":
            raise InvalidArgument("on_miss: 'error' is not accepted in Train (the step's gradients would "
                                  "already be applied when a lookup fails); use Lookup")
        for index, piece in enumerate(request.gradients):
            where = f"gradients[{index}]"
            ids = decode_ids(piece.ids, f"{where}.ids")
            step.rows = self._count_rows(step.rows, len(ids))
            dim = self.store.describe_table(piece.table).dim          # NOT_FOUND before buffering
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
                ids = decode_ids(piece.ids, f"{kind}[{index}].ids")
                step.rows = self._count_rows(step.rows, len(ids))
                self.store.describe_table(piece.table)
                into.setdefault(piece.table, []).append(ids)

    def _run_step(self, step: _Step) -> list[pb.TrainResponse]:
        """Validate, step, look up: the step's answer, in messages."""
        gradients = {table: (concat(ids), concat(grads)) for table, (ids, grads) in step.gradients.items()}
        for table, (_, grads) in list(gradients.items())[1:]:
            # the store checks the table it steps before changing it; the others are checked
            # here first, so a bad table anywhere in the step changes no table
            if not self.store.describe_table(table).allow_nonfinite and not np.isfinite(grads).all():
                raise InvalidArgument(f"gradients: contain NaN or Inf for table {table!r} (it does not allow them)")
        self._check_data_budget(step, gradients)
        stepped = {table: self.store.apply_gradients(table, ids, grads) for table, (ids, grads) in gradients.items()}
        rows = [(table, self.store.lookup(table, concat(parts), step.on_miss).weights)
                for table, parts in step.lookups.items()]
        return list(_responses(rows, stepped))

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


def _responses(rows: list[tuple[str, np.ndarray]], stepped: dict[str, int]):
    """The step's answer in messages of about RESPONSE_BYTES; each table's rows in order."""
    response = pb.TrainResponse(stepped=stepped)
    size = 0
    for table, weights in rows:
        step = max(1, RESPONSE_BYTES // max(1, weights[:1].nbytes))
        for start in range(0, max(1, len(weights)), step):
            part = weights[start:start + step]
            if size and size + part.nbytes > RESPONSE_BYTES:
                response.more = True
                yield response
                response, size = pb.TrainResponse(), 0
            response.rows.add(table=table, values=encode_tensor(part))
            size += part.nbytes
    yield response
