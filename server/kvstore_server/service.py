"""The servicer: converts messages, calls the Store in the bounded executor, lets `rpc` map the errors.

Every handler is a coroutine that gets parsed requests (see `rpc.bind`).
Store work runs in the executor, with two exceptions. A Lookup chunk whose rows
are all cached, at most `inline_lookup_bytes` of them, and whose table lock is
free right now is served on the event loop (`Store.lookup_if_cached`:
a probe and a gather, no waiting, no RocksDB), which saves two thread hand-offs
per chunk; anything else goes to the executor as before. Likewise an ApplyGradients call of
cached rows within that bound (no lock owner, no scores) steps them on the loop when nothing
in it waits (`Store.apply_gradients_if_cached`).
Streamed writes (Update, Delete, ApplyGradients) stage every chunk and commit
once, after the chunk marked `last` and a clean half-close (`rpc.whole_stream`):
a bad chunk, a cancellation or a broken connection at any point applies nothing. Their idempotency key makes a
retry answer with the first result (`idempotency.RecentWrites`).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
from kvstore_proto.tensors import decode_ids, decode_tensor, encode_lookup_response, lookup_response_into
from kvstore_proto.v1 import kvstore_pb2 as pb

from kvstore import Store
from kvstore.dtypes import weight_dtype
from kvstore.errors import InvalidArgument, KVStoreError, ResourceExhausted

from .allocator import DiskReads, return_freed_memory
from .budgets import check_new_table, default_cache_budget
from .cluster_service import ClusterRPCs
from .config import ServerConfig
from .data_budget import DataBudget, default_data_budget, with_default_max_rows
from .idempotency import RecentWrites
from .lease_service import LeaseRPCs
from .messages import concat, on_miss_name, table_config_from_proto, table_config_to_proto
from .metrics import Metrics
from .races import on_table
from .replication_service import ReplicationRPCs
from .request_budget import RequestMemory
from .row_buffer import RowBuffer
from .rpc import StoreWork, whole_stream
from .same_host_service import SameHostRPCs
from .training_service import TrainingRPCs
from .transfer_service import SnapshotRPCs

MESSAGE_OVERHEAD = 4096   # room for framing and the non-tensor fields of a response
LOOKUP_AHEAD = 2          # chunks of one Lookup stream in the store while an earlier one is sent


class EmbeddingStoreService(ReplicationRPCs, SnapshotRPCs, LeaseRPCs, ClusterRPCs, TrainingRPCs, SameHostRPCs):
    def __init__(self, store: Store, config: ServerConfig, metrics: Metrics, work: StoreWork):
        self.store = store
        self.config = config
        self.metrics = metrics
        self.work = work
        self.recent = RecentWrites(config.idempotency_keys, config.idempotency_seconds)
        self.cache_budget = config.max_cache_bytes or default_cache_budget()
        self.request_memory = RequestMemory.from_options(config.max_buffered_bytes, config.max_buffered_bytes_per_peer)
        self.data_budget = DataBudget(store, config.max_data_bytes or default_data_budget(config.data_dir))
        metrics.watch_budgets(lambda: self.request_memory.used, lambda: self.data_budget.used)
        self._creating = asyncio.Lock()
        self._disk_reads = DiskReads()
        LeaseRPCs.__init__(self, config.lease_seconds)
        SameHostRPCs.__init__(self, config.same_host)
        if self.segments is not None:
            metrics.watch_same_host(lambda: len(self.segments), lambda: len(self.device_buffers))

    # --- tables ----------------------------------------------------------------

    async def CreateTable(self, request, context):
        config = table_config_from_proto(request.config, self.config.cache_device)
        config = with_default_max_rows(config, self.config.default_max_rows)
        async with self._creating:               # budgets are checked and taken one table at a time
            await self.work(check_new_table, self.store, config, self.config.max_tables, self.cache_budget)
            config = await self.work(self.store.create_table, config)
        return pb.CreateTableResponse(config=table_config_to_proto(config))

    async def DropTable(self, request, context):
        await self.work(self.store.drop_table, request.table)
        return pb.DropTableResponse()

    async def ListTables(self, request, context):
        return pb.ListTablesResponse(tables=await self.work(self.store.list_tables))

    async def DescribeTable(self, request, context):
        return pb.DescribeTableResponse(config=table_config_to_proto(self.store.describe_table(request.table)))

    async def Stats(self, request, context):
        return pb.StatsResponse(table=request.table, counters=await self.on_table(request.table, self.store.stats,
                                                                                request.table))

    # --- rows --------------------------------------------------------------------

    async def Lookup(self, requests: AsyncIterator, context):
        """Each chunk is looked up as soon as it arrives (`_lookup_now`: on the loop or in the executor).
        The first chunk is answered directly, so a one-chunk stream (a batch under the client's
        chunk size) costs no task and no queue; from the second chunk on, `_pipelined` reads and
        looks up to LOOKUP_AHEAD chunks ahead of the one being sent (chunk i+1 is gathered while
        grpc writes chunk i). Responses keep request order."""
        request = await anext(requests, None)
        if request is not None:
            answer = self._lookup_now(request)
            yield answer if isinstance(answer, bytes) else await answer    # serialized: one copy of the rows
            request = await anext(requests, None)
            if request is not None:
                async for answer in self._pipelined(self._lookup_now(request), requests):
                    yield answer
        await self._after_reads()

    async def _pipelined(self, first: bytes | asyncio.Future, requests: AsyncIterator) -> AsyncIterator[bytes]:
        """The answers to `first` and to every later chunk, each looked up as soon as it arrives."""
        ahead: asyncio.Queue = asyncio.Queue(LOOKUP_AHEAD)
        ahead.put_nowait(first)
        reader = asyncio.create_task(self._lookups_ahead(requests, ahead))
        try:
            while (answer := await ahead.get()) is not None:
                yield answer if isinstance(answer, bytes) else await answer
            await reader                                          # a malformed chunk ends the stream here
        finally:
            reader.cancel()
            while not ahead.empty():
                answer = ahead.get_nowait()
                if isinstance(answer, asyncio.Future):
                    answer.cancel()

    async def _after_reads(self) -> None:
        """Return the memory that many reads from RocksDB freed (a few ms, off the loop, once per
        `allocator.ROWS_READ_PER_TRIM` rows read: seconds of reads)."""
        try:
            due = self._disk_reads.due(self.store.rocks.rows_read)
        except KVStoreError:                                      # closed: nothing to return
            return
        if due:
            await asyncio.to_thread(return_freed_memory)

    async def _lookups_ahead(self, requests: AsyncIterator, ahead: asyncio.Queue) -> None:
        """Start the lookup of every chunk that arrives; None once the requests end (or fail: the
        error is this task's, raised where Lookup awaits it)."""
        previous = None
        try:
            async for request in requests:
                previous = self._lookup_now(request, previous)
                await ahead.put(previous)
        except asyncio.CancelledError:
            raise                                                 # Lookup is gone: nobody waits for the end
        except BaseException:
            await ahead.put(None)
            raise
        await ahead.put(None)

    def _lookup_now(self, request: pb.LookupRequest, previous: bytes | asyncio.Future | None = None
                    ) -> bytes | asyncio.Future:
        """The response to one chunk when it can be served here on the loop (every row cached, at most
        `inline_lookup_bytes` of rows, the table free now), else its lookup started in the executor.
        `previous`: the answer to the stream's chunk before this one. While that one is still in a
        store thread it holds the table lock, so this chunk would find the lock taken and follow it
        there; it waits for it instead and is then served like a chunk just arrived (a chunk with one
        uncached row sends that chunk to the store threads, not every chunk read ahead behind it)."""
        if request.lease:
            self.leases.renew_if_live(request.lease)              # a lookup never fails over its lease
        ids = decode_ids(request.ids, "ids")
        self._check_chunk(len(ids))
        on_miss = on_miss_name(request.on_miss)
        row_bytes = self._check_response_size(request.table, len(ids), request.with_state)
        chunk = (request.table, ids, on_miss, request.with_state)
        if isinstance(previous, asyncio.Future) and not previous.done():
            return asyncio.ensure_future(self._lookup_after(previous, row_bytes, *chunk))
        return self._lookup_started(row_bytes, *chunk)

    def _lookup_started(self, row_bytes: int, table: str, ids: np.ndarray, on_miss: str,
                        with_state: bool) -> bytes | asyncio.Future:
        response = self._inline_response(table, ids, with_state, row_bytes)
        if response is not None:
            return response
        return asyncio.ensure_future(self.on_table(table, self._lookup_chunk, table, ids, on_miss, with_state))

    def _inline_response(self, table: str, ids: np.ndarray, with_state: bool, nbytes: int) -> bytes | None:
        """The serialized response when `_inline_lookup` serves the chunk, else None."""
        if nbytes > self.config.inline_lookup_bytes:
            return None
        return self._response(table, ids, with_state, lambda out: self._inline_lookup(table, ids, with_state,
                                                                                      nbytes, out))

    def _inline_lookup(self, table: str, ids: np.ndarray, with_state: bool, nbytes: int,
                       out: np.ndarray | None = None):
        """The rows, read here on the event loop, when every one is cached, they are at most
        `inline_lookup_bytes`, and the table is free now; else None (the store threads take it).
        `out`: where the weights go (see `Store.lookup_if_cached`)."""
        if nbytes > self.config.inline_lookup_bytes:
            return None
        return on_table(self.store, table, self.store.lookup_if_cached, table, ids, with_state, out)

    def _row_shape(self, table: str) -> tuple[int, np.dtype]:
        config = self.store.describe_table(table)
        return config.dim, weight_dtype(config.dtype)

    async def _lookup_after(self, previous: asyncio.Future, row_bytes: int, *chunk) -> bytes:
        await asyncio.wait((previous,))              # its outcome is its own chunk's: only its end counts here
        answer = self._lookup_started(row_bytes, *chunk)
        return answer if isinstance(answer, bytes) else await answer

    def _lookup_chunk(self, table: str, ids: np.ndarray, on_miss: str, with_state: bool) -> bytes:
        """In a store thread (cached rows gathered into the response, missing ones written there
        once read or initialized)."""
        return self._response(table, ids, with_state,
                              lambda out: self.data_budget.lookup(table, ids, on_miss, with_state, out))

    def _response(self, table: str, ids: np.ndarray, with_state: bool, lookup) -> bytes | None:
        """The serialized response of `lookup(out)` (None when it gives None). Weights asked for
        alone are written straight into the message (`lookup_response_into`): no copy after."""
        into = None if with_state else lookup_response_into(len(ids), *self._row_shape(table))
        result = lookup(into and into[1])
        if result is None:
            return None
        if into is not None and result.weights is into[1]:
            return into[0]
        return encode_lookup_response(result.weights, result.state)

    async def Update(self, requests: AsyncIterator, context):
        with self.request_memory.hold(context) as held:
            return await self._update(held.chunks(whole_stream(requests, context), requests))

    async def _update(self, requests: AsyncIterator):
        staged = _Staged()
        dim, dtype, with_state, score_parts, state_rows = 0, "", False, [], RowBuffer()
        async for request in requests:
            index = staged.next_chunk(request.table, request.idempotency_key)
            if index == 0:                              # unknown table: NOT_FOUND before buffering
                config = self.store.describe_table(staged.table)
                dim, dtype = config.dim, config.dtype
                with_state = request.HasField("state")
            ids = staged.add_ids(decode_ids(request.ids, "ids"), self._count_rows)
            weights = decode_tensor(request.weights, "weights", dtype)      # the table's dtype, or lossless
            _check_matrix(weights, len(ids), dim, "weights", staged.values.first)
            if request.HasField("state") != with_state:
                raise InvalidArgument(f"state: chunk {index} {'lacks' if with_state else 'has'} state; "
                                      "give state in every chunk of an update or in none")
            if with_state:
                state = decode_tensor(request.state, "state", "float32")
                _check_matrix(state, len(ids), None, "state", state_rows.first)
                state_rows.append(state)
            _collect_scores(request, index, len(ids), score_parts)
            staged.values.append(weights)
        if staged.table is None:
            return pb.UpdateResponse(rows=0)
        state = state_rows.take() if with_state else None
        scores = concat(score_parts) if score_parts else None

        async def commit():
            self.data_budget.check("an update")
            rows = await self.on_table(staged.table, self.store.update, staged.table, staged.ids(),
                                       staged.values.take(), state, scores)
            return pb.UpdateResponse(rows=rows)

        return await self.recent.once("Update", staged.key, commit)

    async def Delete(self, requests: AsyncIterator, context):
        with self.request_memory.hold(context) as held:
            return await self._delete(held.chunks(whole_stream(requests, context), requests))

    async def _delete(self, requests: AsyncIterator):
        staged = _Staged()
        async for request in requests:
            if staged.next_chunk(request.table, request.idempotency_key) == 0:
                self.store.describe_table(staged.table)        # unknown table: NOT_FOUND before buffering
            staged.add_ids(decode_ids(request.ids, "ids"), self._count_rows)
        if staged.table is None:
            return pb.DeleteResponse(rows=0)

        async def commit():
            return pb.DeleteResponse(rows=await self.on_table(staged.table, self.store.delete, staged.table,
                                                              staged.ids()))

        return await self.recent.once("Delete", staged.key, commit)

    # --- training --------------------------------------------------------------------

    async def ApplyGradients(self, requests: AsyncIterator, context):
        with self.request_memory.hold(context) as held:
            return await self._apply_gradients(held.chunks(whole_stream(requests, context), requests))

    async def _apply_gradients(self, requests: AsyncIterator):
        staged, dim, owner, score_parts = _Staged(), 0, "", []
        async for request in requests:
            index = staged.next_chunk(request.table, request.idempotency_key)
            ids = staged.add_ids(decode_ids(request.ids, "ids"), self._count_rows)
            grads = decode_tensor(request.grads, "grads", "float32")
            if index == 0:
                dim = self.store.describe_table(staged.table).dim
                owner = request.owner
            _check_matrix(grads, len(ids), dim, "grads", staged.values.first)
            _collect_scores(request, index, len(ids), score_parts)
            staged.values.append(grads)
        if staged.table is None:
            return pb.ApplyGradientsResponse(rows=0)
        if owner:
            self.leases.renew_if_live(owner)           # a lapsed lease's locks are gone; the step still runs
        scores = concat(score_parts) if score_parts else None

        async def commit():
            ids, grads = staged.ids(), staged.values.take()
            stepped = None
            if not owner and scores is None and not self.data_budget.exhausted \
                    and grads.nbytes <= self.config.inline_lookup_bytes:   # on the loop, if nothing waits
                stepped = on_table(self.store, staged.table, self.store.apply_gradients_if_cached, staged.table,
                                   ids, grads)
            if stepped is None:
                stepped = await self.on_table(staged.table, self.data_budget.apply_gradients, staged.table, ids,
                                              grads, owner or None, scores)
            return pb.ApplyGradientsResponse(rows=stepped)

        return await self.recent.once("ApplyGradients", staged.key, commit)

    # --- eviction --------------------------------------------------------------------

    async def Evict(self, request, context):
        return pb.EvictResponse(evicted=await self.on_table(request.table, self.store.evict, request.table))

    async def RestoreRows(self, request, context):
        ids = decode_ids(request.ids, "ids")
        self._count_rows(0, len(ids))
        self.data_budget.check("restoring archived rows")
        return pb.RestoreRowsResponse(rows=await self.on_table(request.table, self.store.restore_rows,
                                                               request.table, ids))

    async def on_table(self, table: str, fn, *args):
        """Store work on `table` in the executor; a failure caused by a concurrent drop is NOT_FOUND."""
        return await self.work(on_table, self.store, table, fn, *args)

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

    def _check_response_size(self, table: str, n: int, with_state: bool) -> int:
        """The bytes of the rows answering n ids (RESOURCE_EXHAUSTED when their message is over the limit)."""
        config = self.store.describe_table(table)
        row_bytes = config.dim * weight_dtype(config.dtype).itemsize + (config.state_dim * 4 if with_state else 0)
        size = n * row_bytes + MESSAGE_OVERHEAD
        if size > self.config.max_message_bytes:
            raise ResourceExhausted(
                f"ids: {n} rows of table {table!r} make a {size}-byte response, over the message limit of "
                f"{self.config.max_message_bytes} bytes; send at most {self._rows_per_message(row_bytes)} ids "
                "per chunk"
            )
        return n * row_bytes

    def _rows_per_message(self, row_bytes: int) -> int:
        return max(1, (self.config.max_message_bytes - MESSAGE_OVERHEAD) // max(1, row_bytes))


class _Staged:
    """The chunks of one streamed write, held until the client half-closes: the table named by the
    first chunk, its idempotency key, the ids of each chunk and the rows, held once (`RowBuffer`)."""

    def __init__(self):
        self.table: str | None = None
        self.key = ""
        self.index = -1
        self.rows = 0
        self.id_parts: list[np.ndarray] = []
        self.values = RowBuffer()

    def next_chunk(self, table: str, key: str) -> int:
        """Index of the chunk now arriving; later chunks repeat the table (or leave it empty)."""
        self.index += 1
        if self.table is None:
            self.table, self.key = table, key
        elif table and table != self.table:
            raise InvalidArgument(f"table: chunk {self.index} names {table!r} but the stream began with "
                                  f"{self.table!r}")
        return self.index

    def add_ids(self, ids: np.ndarray, count_rows) -> np.ndarray:
        self.rows = count_rows(self.rows, len(ids))
        self.id_parts.append(ids)
        return ids

    def ids(self) -> np.ndarray:
        return concat(self.id_parts)


def _check_matrix(values: np.ndarray, n: int, width: int | None, field: str, first: np.ndarray | None) -> None:
    """One chunk's [n, width] tensor, consistent in dtype and width with earlier chunks."""
    if values.ndim != 2 or values.shape[0] != n:
        raise InvalidArgument(f"{field}: expected shape ({n}, {width if width is not None else 'k'}) "
                              f"for {n} ids, got {values.shape}")
    if width is not None and values.shape[1] != width:
        raise InvalidArgument(f"{field}: expected {width} columns (the table dim), got {values.shape[1]}")
    if first is not None and (values.dtype != first.dtype or values.shape[1] != first.shape[1]):
        raise InvalidArgument(f"{field}: every chunk must have the dtype and width of the first "
                              f"({first.dtype}, {first.shape[1]}), got ({values.dtype}, {values.shape[1]})")


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
