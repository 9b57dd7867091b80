"""Replication RPCs, a mixin of the servicer: Subscribe, delta exports, ImportChain.

Subscribe follows the store's change feed: it waits for changes, lets them
gather for the request's interval, then sends the rows of every id changed as
they are at that moment (a hot row once, with its latest value) and tombstones
for ids that no longer exist, and finally a `batch_end` message carrying the
sequence the subscriber now has everything up to. The first message is such an
empty `batch_end` naming where the stream starts (the head for `from_sequence` < 0,
which a bootstrapping follower uses before it exports). With nothing to send it sends
a heartbeat (an empty `batch_end`) every `HEARTBEAT_SECONDS`, so a follower
always knows the primary's head sequence and its own lag.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import numpy as np
from kvstore_proto.tensors import decode_ids, encode_ids, encode_tensor
from kvstore_proto.v1 import kvstore_pb2 as pb

from kvstore import Store
from kvstore.changefeed import ChangeFeed, Changes, OutsideWindow
from kvstore.delta import DeltaChunk, ImportChains, commit_link, export_since, read_table_changes
from kvstore.errors import FailedPrecondition, InvalidArgument, TableNotFound
from kvstore.id_ranges import NO_RANGES
from kvstore.transfer import rows_to_chunk

from .export_encoding import encode_export_chunk
from .idempotency import RecentWrites
from .messages import concat, table_config_to_proto
from .rpc import StoreWork, whole_stream
from .transfer_service import add_rows

HEARTBEAT_SECONDS = 1.0
NO_IDS_ARRAY = np.zeros(0, np.int64)
DEFAULT_INTERVAL = 0.1
MAX_INTERVAL = 60.0
MESSAGE_BYTES = 2 << 20      # rows per Subscribe message: about this many bytes


class FeedSignal:
    """Waits on the event loop for the change feed to move past a sequence, holding no thread:
    the feed's writers wake it (`ChangeFeed.watch`) only while it is armed."""

    def __init__(self, feed: ChangeFeed):
        self.feed = feed
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._armed = False

    def __enter__(self) -> FeedSignal:
        self.feed.watch(self._wake)
        return self

    def __exit__(self, *exc) -> None:
        self.feed.unwatch(self._wake)

    def _wake(self) -> None:                        # a writer's thread, holding the feed's lock
        if self._armed:
            self._armed = False
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:                    # the loop closed: nobody waits any more
                pass

    async def wait_beyond(self, sequence: int, timeout: float) -> bool:
        """True once a change after `sequence` exists; False after `timeout` or when the feed is ending."""
        self._event.clear()
        self._armed = True
        try:
            if self.feed.last <= sequence and not self.feed.ending:
                try:
                    await asyncio.wait_for(self._event.wait(), timeout)
                except TimeoutError:
                    pass
        finally:
            self._armed = False
        return self.feed.last > sequence and not self.feed.ending


class ReplicationRPCs:
    """Subscribe and ImportChain, and the delta form of Export (`since_sequence` set)."""

    store: Store
    work: StoreWork
    recent: RecentWrites

    async def Subscribe(self, request, context):
        feed = self.store.changes
        if request.feed_id and request.feed_id != feed.feed_id:
            raise FailedPrecondition(f"feed_id: this server's change feed is {feed.feed_id!r}, not "
                                     f"{request.feed_id!r} (another data directory); re-bootstrap")
        interval = request.interval_seconds or DEFAULT_INTERVAL
        if not 0 < interval <= MAX_INTERVAL:
            raise InvalidArgument(f"interval_seconds: must be in (0, {MAX_INTERVAL}], got {interval}")
        tables = list(request.tables) or None
        for table in tables or ():
            self.store.describe_table(table)                 # NOT_FOUND before subscribing
        cursor = feed.subscribe(feed.last if request.from_sequence < 0 else request.from_sequence, tables)
        dropped = False
        try:
            yield self._batch_end(cursor.sequence, None)        # subscribed: where the stream starts
            with FeedSignal(feed) as signal:
                while not feed.ending:
                    if not await signal.wait_beyond(cursor.sequence, HEARTBEAT_SECONDS):
                        yield self._batch_end(cursor.sequence, None)
                        continue
                    await asyncio.sleep(interval)               # let changes gather: a hot row is sent once
                    try:
                        changes = await self.work(feed.changes, cursor.sequence, tables)   # np.unique of a window
                    except OutsideWindow:
                        dropped = True                           # fell behind the window: it must re-bootstrap
                        raise
                    async for message in self._batch(changes, request.weights_only):
                        yield message
                    cursor.sequence = changes.through
        finally:
            feed.unsubscribe(cursor, dropped)

    async def _batch(self, changes: Changes, weights_only: bool) -> AsyncIterator[pb.SubscribeResponse]:
        for name in sorted(changes.dropped):             # before any row of a table created again since
            yield pb.SubscribeResponse(table=name, table_dropped=True, sequence=changes.through)
        for name in changes.tables():
            try:
                table = self.store.table(name)
            except TableNotFound:                           # dropped since: nothing to send
                continue
            row_bytes = 8 + table.layout.row_bytes
            chunks = read_table_changes(table, changes.ids.get(name, NO_IDS_ARRAY), changes.ranges.get(name, NO_RANGES),
                                        max(1, MESSAGE_BYTES // row_bytes))
            while (chunk := await self._next_on(name, chunks)) is not None:
                rows = chunk.rows
                yield pb.SubscribeResponse(
                    table=name, ids=encode_ids(rows.ids), weights=encode_tensor(rows.weights),
                    state=None if weights_only else encode_tensor(rows.state),
                    tombstones=encode_ids(chunk.tombstones), sequence=changes.through)
        yield self._batch_end(changes.through, changes.first_time)

    async def _next_on(self, table: str, chunks: Iterator[DeltaChunk]) -> DeltaChunk | None:
        """The next chunk read in the executor; a table dropped during the read ends it (the feed says so)."""
        try:
            return await self.on_table(table, next, chunks, None)
        except TableNotFound:
            return None

    def _batch_end(self, sequence: int, first_time: float | None) -> pb.SubscribeResponse:
        feed = self.store.changes
        return pb.SubscribeResponse(sequence=sequence, batch_end=True, head_sequence=feed.last,
                                    oldest_change_time=first_time or 0.0, feed_id=feed.feed_id)

    # --- delta export and chained import ---------------------------------------

    async def export_delta(self, request, chunk_rows: int | None) -> AsyncIterator[pb.ExportChunk]:
        """Export's stream when `since_sequence` is set: a header chunk without rows, then rows and tombstones."""
        delta = await self.on_table(request.table, export_since, self.store, request.table, request.since_sequence,
                                    chunk_rows)
        layout = delta.table.layout
        empty = DeltaChunk(rows_to_chunk(layout, np.zeros(0, np.int64), layout.empty(0)), np.zeros(0, np.int64))
        header = pb.ExportChunk(config=table_config_to_proto(delta.config), estimated_rows=len(delta.ids),
                                sequence=delta.sequence, since_sequence=delta.since,
                                feed_id=self.store.changes.feed_id).SerializeToString()
        yield encode_export_chunk(empty.rows, header, empty.tombstones)
        chunks = (encode_export_chunk(chunk.rows, b"", chunk.tombstones) for chunk in delta)
        while (message := await self.on_table(request.table, next, chunks, None)) is not None:
            yield message

    async def ImportChain(self, requests: AsyncIterator, context):
        link = _ChainLink(self.store, self._begin_import, lambda key: self.recent.known("ImportChain", key))

        async def commit(staged) -> pb.ImportResponse:
            rows = await self.on_table(staged.table.name, commit_link, self.store, staged, link.sequence, link.since,
                                       concat(link.tombstones))
            return pb.ImportResponse(rows=rows, created=staged.created)

        return await self.staged_import("ImportChain", whole_stream(requests, context, "rows"),
                                        link.begin, link.add, commit, rows_field="rows")


class _ChainLink:
    """One ImportChain call: the link's sequences (from the first request) and the tombstones it carries."""

    def __init__(self, store: Store, begin_import, replayed: Callable[[str], bool]):
        self.store, self._begin_import, self._replayed = store, begin_import, replayed
        self.sequence, self.since, self.tombstones = 0, None, []

    def begin(self, request: pb.ImportChainRequest):
        rows = request.rows
        self.sequence = request.sequence
        self.since = request.since_sequence if request.HasField("since_sequence") else None
        if self.sequence < 0:
            raise InvalidArgument(f"sequence: must be a sequence number >= 0, got {self.sequence}")
        if self.since is not None and not 0 <= self.since <= self.sequence:
            raise InvalidArgument(f"since_sequence: must be in [0, sequence={self.sequence}], got {self.since}")
        if self.since is not None:
            if rows.mode == pb.IMPORT_MODE_REPLACE:
                raise InvalidArgument("rows.mode: a delta is merged; replace is for full exports")
            if not self._replayed(rows.idempotency_key):       # a retry gets the first answer, not a refusal
                ImportChains(self.store.data_dir).check(rows.table, self.since)   # refuse before staging
        return self._begin_import(rows)

    def add(self, stager, request: pb.ImportChainRequest) -> None:
        rows = request.rows
        if rows.HasField("weights"):                  # messages of tombstones alone carry no rows
            add_rows(stager, rows, "rows.")
        self.tombstones.append(decode_ids(request.tombstones, "tombstones"))
