"""ShardedClient: one client over the shards of a cluster, with KVStoreClient's methods.

`KVStoreClient(["a:1", "b:2"])`, `KVStoreClient("a:1,b:2")` and
`KVStoreClient("kvstore.ns.svc.cluster.local:50051", replicas=4)` build one. Every
batch call splits its ids by shard (shard_map.py), calls the shards that own
some of them at once, and puts the results back in request order: duplicates
stay together on one shard, so "last write wins" and "gradients of duplicates
are summed" hold exactly as on one server. Table admin fans out to every shard.
Snapshots, export and import: cluster_transfer.py. The manifest check on
connect: cluster_manifest.py.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .arrays import as_ids, as_rows, like
from .client import KVStoreClient, _as_scores
from .cluster_manifest import join_cluster
from .cluster_transfer import ClusterTransferMethods
from .errors import FailedPreconditionError, InvalidArgumentError, KVStoreError, NotFoundError
from .fanout import FanOut
from .reassembly import Reassembly
from .shard_map import ShardMap, shard_addresses

_MAXIMA = ("_last", "_max")      # stats counters that do not add up across shards


class ShardedClient(ClusterTransferMethods):
    def __init__(self, address: str | list[str] | tuple[str, ...], timeout: float = 30.0,
                 max_message_bytes: int = 16 << 20, chunk_bytes: int = 2 << 20, *, replicas: int | None = None,
                 function: str = "hash", block_size: int = 0, check_manifest: bool = True,
                 adopt_shards: bool = False, clients: list[KVStoreClient] | None = None, **credentials: Any):
        """`address`: the shards in order (a list or a comma-separated string), or a headless Service's
        DNS name with `replicas` (pods NAME-0..NAME-(replicas-1)). `function`/`block_size`: the shard map
        (shard_map.py). The cluster manifest on every shard must agree (FAILED_PRECONDITION otherwise); a
        new, empty cluster gets one. `adopt_shards`: write it to shards that have none even when the others
        do (a replaced shard's fresh volume). Other keywords go to each shard's KVStoreClient; `clients`:
        already open ones, one per address (closed with this client)."""
        self.addresses = shard_addresses(address, replicas)
        self.shard_map = ShardMap(len(self.addresses), function, block_size)
        self.timeout = timeout
        self.fan = FanOut(self.addresses)
        self.shards = clients or [KVStoreClient(a, timeout, max_message_bytes, chunk_bytes, **credentials)
                                  for a in self.addresses]
        if len(self.shards) != len(self.addresses):
            raise InvalidArgumentError(message=f"clients: {len(self.shards)} clients for {len(self.addresses)} shards")
        self.cluster_id = ""
        try:
            if check_manifest:
                self.cluster_id = join_cluster(self, adopt_shards)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
        self.fan.close()

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- tables ----------------------------------------------------------------

    def create_table(self, name: str, dim: int, *args: Any, **options: Any) -> dict:
        """Create the table on every shard (arguments as KVStoreClient.create_table); if any shard
        refuses, the shards that created it drop it again."""
        outcomes = self.fan.settle(lambda i: self.shards[i].create_table(name, dim, *args, **options))
        created = [i for i, result in outcomes.items() if isinstance(result, dict)]
        if len(created) < len(self.shards):
            self.fan.settle(lambda i: self.shards[i].drop_table(name), created)
            self.fan.raise_failures(outcomes)
        return outcomes[0]

    def drop_table(self, name: str) -> None:
        """Drop on every shard; NOT_FOUND only when no shard had it (so a half-done drop can be finished)."""
        outcomes = self.fan.settle(lambda i: self.shards[i].drop_table(name))
        if all(isinstance(r, NotFoundError) for r in outcomes.values()):
            self.fan.raise_failures(outcomes)
        self.fan.raise_failures({i: r for i, r in outcomes.items() if not isinstance(r, NotFoundError)})

    def list_tables(self) -> list[str]:
        """Tables present on every shard (one on some shards only is broken: describe_table names it)."""
        listed = self.fan.each(lambda i: self.shards[i].list_tables())
        common = set.intersection(*(set(names) for names in listed.values()))
        return [name for name in listed[0] if name in common]

    def describe_table(self, name: str) -> dict:
        """The table's config; FAILED_PRECONDITION naming the shard whose config differs from shard 0's."""
        configs = self.fan.each(lambda i: self.shards[i].describe_table(name))
        for index, config in configs.items():
            if config != configs[0]:
                fields = sorted(k for k in config if config[k] != configs[0].get(k))
                raise FailedPreconditionError(message=f"shard {index} ({self.addresses[index]}): table {name!r} "
                                                      f"differs from shard 0's in {fields}")
        return configs[0]

    def stats(self, table: str) -> dict[str, float]:
        """Counters summed over shards (`*_last` and `*_max` take the maximum); per shard: `shard_stats`."""
        total: dict[str, float] = {}
        for counters in self.shard_stats(table):
            for key, value in counters.items():
                total[key] = max(total.get(key, value), value) if key.endswith(_MAXIMA) else total.get(key, 0) + value
        return total

    def shard_stats(self, table: str) -> list[dict[str, float]]:
        return list(self.fan.each(lambda i: self.shards[i].stats(table)).values())

    def health(self, service: str = "") -> str:
        """SERVING when every shard is; otherwise the first other status; an unreachable shard raises."""
        statuses = self.fan.each(lambda i: self.shards[i].health(service))
        return next((s for s in statuses.values() if s != "SERVING"), "SERVING")

    def evict(self, table: str) -> dict[str, int]:
        """One eviction sweep on every shard; rows evicted by reason, summed."""
        total: dict[str, int] = {}
        for evicted in self.fan.each(lambda i: self.shards[i].evict(table)).values():
            for reason, rows in evicted.items():
                total[reason] = total.get(reason, 0) + rows
        return total

    # --- rows --------------------------------------------------------------------

    def lookup(self, table: str, ids: Any, on_miss: str = "init_insert", with_state: bool = False,
               out: np.ndarray | None = None):
        """Rows of `ids` in request order, from the shards that own them (`out` as in KVStoreClient)."""
        id_array = as_ids(ids)
        parts = self._split(id_array)
        if len(parts) == 1:                              # one shard owns every id: its answer is the answer
            (index,) = parts
            return self.fan.each(lambda i: self.shards[i].lookup(table, ids, on_miss, with_state, out),
                                 [index])[index]
        result = Reassembly(len(id_array), with_state, out=out)   # each shard's answer copied once, to its place
        self.fan.each(lambda i: self.shards[i].lookup_into(table, id_array[parts[i]], result.sink(parts[i]),
                                                           on_miss, with_state), list(parts))
        if with_state:
            return like(result.weights, ids), like(result.state, ids)
        return like(result.weights, ids)

    def update(self, table: str, ids: Any, weights: Any, state: Any = None, scores: Any = None) -> int:
        id_array = as_ids(ids)
        weight_array = as_rows(weights, len(id_array), "weights")
        state_array = None if state is None else as_rows(state, len(id_array), "state")
        score_array = _as_scores(scores, len(id_array))
        return self._rows_call(id_array, lambda i, at: self.shards[i].update(
            table, id_array[at], weight_array[at], _take(state_array, at), _take(score_array, at)))

    def delete(self, table: str, ids: Any) -> int:
        id_array = as_ids(ids)
        return self._rows_call(id_array, lambda i, at: self.shards[i].delete(table, id_array[at]))

    def apply_gradients(self, table: str, ids: Any, grads: Any, release: bool = False, scores: Any = None) -> int:
        id_array = as_ids(ids)
        grad_array = as_rows(grads, len(id_array), "grads").astype(np.float32, copy=False)
        score_array = _as_scores(scores, len(id_array))
        return self._rows_call(id_array, lambda i, at: self.shards[i].push_gradients(
            table, id_array, grad_array, at, release, score_array))

    def prefetch(self, table: str, ids: Any, lock: bool = False) -> int:
        id_array = as_ids(ids)
        return self._rows_call(id_array, lambda i, at: self.shards[i].prefetch(table, id_array[at], lock))

    def release(self, table: str, ids: Any) -> int:
        id_array = as_ids(ids)
        return self._rows_call(id_array, lambda i, at: self.shards[i].release(table, id_array[at]))

    def restore_rows(self, table: str, ids: Any) -> int:
        id_array = as_ids(ids)
        return self._rows_call(id_array, lambda i, at: self.shards[i].restore_rows(table, id_array[at]))

    def split(self, ids: Any) -> list[np.ndarray]:
        """For each shard, the positions of its ids in `ids` (request order kept): for callers that batch
        several tables per shard themselves."""
        return self.shard_map.split(as_ids(ids))

    def _split(self, id_array: np.ndarray) -> dict[int, np.ndarray]:
        """Positions per shard that owns some of the ids; shard 0 alone for an empty batch, so an
        empty call still checks the table and the arguments as one server would."""
        parts = {i: at for i, at in enumerate(self.shard_map.split(id_array)) if len(at)}
        return parts or {0: np.arange(0)}

    def _rows_call(self, id_array: np.ndarray, call: Callable[[int, np.ndarray], int]) -> int:
        """call(shard, positions) on every shard owning some ids; the counts (unique rows) add up."""
        parts = self._split(id_array)
        outcomes = self.fan.settle(lambda i: call(i, parts[i]), list(parts))
        applied = [i for i, r in outcomes.items() if not isinstance(r, KVStoreError)]
        try:
            self.fan.raise_failures(outcomes)
        except KVStoreError as error:
            error.applied_shards = applied     # their part of the call took effect: retry only the others' ids
            if applied:
                error.message += f" (shards {applied} applied their part; retry only the ids of the failed shards)"
                error.args = (error.message,)
            raise
        return sum(outcomes.values())


def _take(array: np.ndarray | None, at: np.ndarray) -> np.ndarray | None:
    return None if array is None else array[at]
