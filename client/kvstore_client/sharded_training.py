"""Training steps over the shards of a cluster: one ordered `Train` stream per shard.

A step's gradients, lookups and prefetches are split by shard (shard_map.py) and
each shard gets its part on its own stream, all without waiting. An id lives on
one shard, so each row still sees every earlier step's gradients before a later
step reads it: results equal one server's, bit for bit (the server sums a row's
duplicate gradients, and they all go to the row's shard). Answers are copied once,
from each shard's received bytes to their rows' places in request order.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .arrays import as_ids, as_rows
from .errors import KVStoreError
from .reassembly import Allocate, Reassembly
from .sharding import ShardedClient
from .training_stream import TrainingStream, TrainStep

Positions = dict[int, np.ndarray]       # shard -> positions of its ids in the request


class ShardedTrainStep:
    """One step's answers from the shards it went to, reassembled in request order."""

    def __init__(self, stream: ShardedTrainingStream, steps: dict[int, TrainStep],
                 lookups: dict[str, tuple[int, Positions]]):
        self._stream = stream
        self.steps = steps                   # shard -> its part of the step
        self.lookups = lookups               # table -> (rows expected, positions per shard)

    def wait(self) -> None:
        """Wait for every shard's answer (so every failed stream is ended: the next step opens a new
        one); raises the first failure, naming every shard that failed."""
        self._stream.client.fan.raise_failures({index: _waited(step) for index, step in self.steps.items()})

    def result(self, allocate: Allocate = np.empty) -> tuple[dict[str, int], dict[str, np.ndarray]]:
        """As TrainStep.result: unique rows stepped per table (summed over shards) and the
        looked-up weights per table, in request order."""
        self.wait()
        stepped: dict[str, int] = {}
        for step in self.steps.values():
            for table, count in step.stepped.items():
                stepped[table] = stepped.get(table, 0) + count
        rows = {}
        for table, (n, parts) in self.lookups.items():
            result = Reassembly(n, allocate=allocate)
            for index, positions in parts.items():
                self.steps[index].place_rows(table, result.sink(positions))
            rows[table] = result.result()
        return stepped, rows


class ShardedTrainingStream:
    """TrainingStream's interface over a ShardedClient: `send`, `flush`, `close`."""

    def __init__(self, client: ShardedClient):
        self.client = client
        self._streams = [TrainingStream(shard) for shard in client.shards]

    def send(self, gradients: dict[str, tuple[Any, Any]] | None = None, lookups: dict[str, Any] | None = None,
             on_miss: str = "init_insert", prefetches: dict[str, Any] | None = None,
             device=None) -> ShardedTrainStep:
        """As TrainingStream.send; each shard gets the part of the step it owns. Rows come back as
        NumPy arrays (`device` is not used: the shards' parts are put together on the host)."""
        per_shard: dict[int, dict[str, dict]] = {}

        def add(index: int, kind: str, table: str, piece: Any) -> None:
            per_shard.setdefault(index, {"gradients": {}, "lookups": {}, "prefetches": {}})[kind][table] = piece

        for table, (ids, grads) in (gradients or {}).items():
            id_array = as_ids(ids)
            grad_array = as_rows(grads, len(id_array), f"gradients[{table!r}]")
            for index, at in self._split(id_array).items():
                add(index, "gradients", table, (id_array[at], grad_array[at]))
        expected: dict[str, tuple[int, Positions]] = {}
        for kind, tables in (("lookups", lookups or {}), ("prefetches", prefetches or {})):
            for table, ids in tables.items():
                id_array = as_ids(ids)
                parts = self._split(id_array)
                for index, at in parts.items():
                    add(index, kind, table, id_array[at])
                if kind == "lookups":
                    expected[table] = (len(id_array), parts)
        steps = {index: self._streams[index].send(on_miss=on_miss, **pieces)
                 for index, pieces in sorted(per_shard.items())}
        return ShardedTrainStep(self, steps, expected)

    def flush(self) -> None:
        """Wait until every shard has answered every step sent so far; raises the first error."""
        self.client.fan.raise_failures({index: _waited(stream, "flush") for index, stream in enumerate(self._streams)})

    def close(self) -> None:
        for stream in self._streams:
            stream.close()

    def _split(self, id_array: np.ndarray) -> Positions:
        return self.client._split(id_array)


def _waited(waitable: Any, method: str = "wait") -> KVStoreError | None:
    try:
        getattr(waitable, method)()
    except KVStoreError as error:
        return error
    return None


def open_training_stream(client: Any) -> TrainingStream | ShardedTrainingStream:
    """The training stream for a client: one stream per shard for a ShardedClient."""
    return ShardedTrainingStream(client) if isinstance(client, ShardedClient) else TrainingStream(client)
