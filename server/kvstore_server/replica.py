"""Read-only replica mode (`kvstore-server --replica-of ADDRESS`): follow a primary's change feed.

The follower runs on one background thread. Without a saved position it
bootstraps: it subscribes at the primary's head first (so nothing after that
point can be missed), exports every table of the primary into the local store
(replace), drops local tables the primary lacks, then applies the stream it
already holds. Otherwise it resumes from the position saved in
`<data-dir>/replica.json`, which it writes only after a store flush made every
row applied up to that sequence durable, so after a kill -9 it re-applies, never
skips. A primary that no longer holds that sequence (window passed, crash,
restore, another data directory) answers FAILED_PRECONDITION: the follower
re-bootstraps. Connection errors are retried with backoff.

Writes from clients are refused by `ReadOnlyInterceptor`; lookups that would insert
(`init_insert`) only initialize. Table eviction rules are the primary's job: its
evictions arrive as tombstones, so replica tables are created without them.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from kvstore_proto.tensors import decode_ids, decode_tensor
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc

from kvstore import EvictionConfig, Store, TableConfig
from kvstore.changefeed import ChangeFeedConfig
from kvstore.devices import placed_here
from kvstore.errors import InvalidArgument, KVStoreError, TableNotFound
from kvstore.thread_names import os_named
from kvstore.transfer import RowChunk

from .messages import table_config_from_proto

log = logging.getLogger("kvstore_server")
POSITION_FILE = "replica.json"
TRANSFER_TIMEOUT = 24 * 3600.0
CALL_TIMEOUT = 30.0
REASON_KEY = "kvstore-reason"


@dataclass(frozen=True)
class ReplicationConfig:
    """The change feed a server keeps (as a primary) and how it follows one (as a replica)."""

    window_rows: int = 1 << 22           # ids the change feed holds; resuming needs a sequence inside it
    interval_seconds: float = 0.1        # replica: changes gathered per batch by the primary
    checkpoint_seconds: float = 5.0      # replica: flush and save its position this often
    retry_seconds: float = 5.0           # replica: longest wait between reconnection attempts
    tls_ca: str = ""                     # replica: PEM CA bundle of the primary's certificate; set = TLS
    tls_cert: str = ""                   # replica: client certificate for a primary with mutual TLS ...
    tls_key: str = ""                    # ... and its key
    insecure: bool = False               # replica: may send the token in clear to a non-loopback primary

    def __post_init__(self):
        try:
            ChangeFeedConfig(window_rows=self.window_rows)
        except InvalidArgument as exc:
            raise InvalidArgument(f"replication.{exc}") from None
        for name in ("interval_seconds", "checkpoint_seconds", "retry_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise InvalidArgument(f"replication.{name}: must be a number in (0, 3600], got {value!r}")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            if not isinstance(getattr(self, name), str):
                raise InvalidArgument(f"replication.{name}: must be a file path (a string)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgument("replication.tls_cert: replication.tls_cert and replication.tls_key must be "
                                  "given together")
        if self.tls_cert and not self.tls_ca:
            raise InvalidArgument("replication.tls_cert: a client certificate needs replication.tls_ca (TLS)")
        if not isinstance(self.insecure, bool):
            raise InvalidArgument(f"replication.insecure: must be true or false, got {self.insecure!r}")


@dataclass
class Position:
    feed_id: str
    sequence: int


class PositionFile:
    """Where the replica is in the primary's feed, fsync'd and replaced atomically."""

    def __init__(self, data_dir: str):
        self.path = os.path.join(data_dir, POSITION_FILE)

    def load(self) -> Position | None:
        try:
            with open(self.path) as src:
                saved = json.load(src)
            return Position(str(saved["feed_id"]), int(saved["sequence"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("replica: ignoring unreadable %s (%s): re-bootstrapping", POSITION_FILE, exc)
            return None

    def save(self, position: Position | None) -> None:
        if position is None:
            if os.path.exists(self.path):
                os.remove(self.path)
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as out:
            json.dump(dataclasses.asdict(position), out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)


class FollowerStats:
    """What the metrics page shows of a follower."""

    def __init__(self):
        self.applied_sequence = 0
        self.head_sequence = 0
        self.lag_seconds = 0.0
        self.connected = False
        self.bootstrapped = False
        self.counters: Counter[str] = Counter()       # rows_applied, tombstones_applied, bootstraps_<reason>


class Follower:
    """Keeps `store` a copy of the primary at `primary`; `start` it once, `stop` before the store closes."""

    def __init__(self, store: Store, primary: str, config: ReplicationConfig | None = None,
                 token: str | None = None, max_message_bytes: int = 16 << 20,
                 on_bootstrapped: Callable[[], None] | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        self.store = store
        self.primary = primary
        self.config = config or ReplicationConfig()
        self.stats = FollowerStats()
        self._positions = PositionFile(store.data_dir)
        self._position = self._positions.load()
        self.resumable = self._position is not None     # has a copy to serve before it reaches the primary
        self._on_bootstrapped = on_bootstrapped
        self._checkpointed = self._position
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        self._channel = (grpc.secure_channel(primary, credentials, options=options) if credentials is not None
                         else grpc.insecure_channel(primary, options=options))
        self._stub = pb_grpc.EmbeddingStoreStub(self._channel)
        self._stop = threading.Event()
        self._call = None
        self._next_reason = "initial"                   # why the next bootstrap happens (a metrics label)
        self._lock = threading.Lock()                  # guards _call against stop()
        self._thread = threading.Thread(target=os_named(self._run), name="kvstore-replica", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the stream, wait for the thread, save the position (after a flush)."""
        self._stop.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
        self._thread.join()
        try:
            self._checkpoint()
        except KVStoreError as exc:
            log.warning("replica: could not save the position on stop: %s", exc)
        self._channel.close()

    # --- the loop ----------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._follow_once()              # returns when the primary ends the stream (it is stopping)
                backoff = 0.1
                self.stats.connected = False
                self._stop.wait(backoff)
            except grpc.RpcError as exc:
                self.stats.connected = False
                if self._stop.is_set():
                    break
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    log.warning("replica: the primary cannot resume us (%s): re-bootstrapping", exc.details())
                    self._forget("window")
                    self._stop.wait(0.1)
                    continue
                log.info("replica: primary %s unavailable (%s); retrying in %.1f s", self.primary,
                         exc.code().name, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.retry_seconds)
            except _Stopped:
                break
            except Exception as exc:       # the thread must live: log, start over from a bootstrap
                log.error("replica: following %s failed: %s; re-bootstrapping", self.primary, exc, exc_info=exc)
                self._forget("error")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.retry_seconds)

    def _forget(self, reason: str) -> None:
        self._position = self._checkpointed = None
        self._positions.save(None)
        self._next_reason = reason

    def _follow_once(self) -> None:
        position = self._position
        request = pb.SubscribeRequest(from_sequence=-1 if position is None else position.sequence,
                                      feed_id="" if position is None else position.feed_id,
                                      interval_seconds=self.config.interval_seconds)
        with self._lock:
            if self._stop.is_set():
                return
            self._call = self._stub.Subscribe(request, metadata=self._metadata)
        try:
            first = next(self._call, None)
            if first is None:                        # the primary is stopping: reconnect
                return
            self.stats.connected = True
            if position is None:
                self._bootstrap(first, self._next_reason)
            self._apply_stream(self._call)
        finally:
            with self._lock:
                self._call = None

    # --- bootstrap ---------------------------------------------------------------

    def _bootstrap(self, start: pb.SubscribeResponse, reason: str) -> None:
        """Copy every table of the primary; the stream (opened at `start`) then brings them up to date."""
        log.info("replica: bootstrapping from %s at sequence %d (%s)", self.primary, start.sequence, reason)
        self._positions.save(None)
        names = list(self._stub.ListTables(pb.ListTablesRequest(), timeout=CALL_TIMEOUT,
                                           metadata=self._metadata).tables)
        for name in names:
            self._copy_table(name)
        for name in set(self.store.list_tables()) - set(names):
            self._drop(name)
        self._position = Position(start.feed_id, start.sequence)
        self._checkpoint()                               # a restart from here resumes instead of copying again
        self.stats.applied_sequence = start.sequence
        self.stats.bootstrapped = True
        self.stats.counters[f"bootstraps_{reason}"] += 1
        if self._on_bootstrapped is not None:
            self._on_bootstrapped()

    def _copy_table(self, name: str) -> None:
        responses = self._stub.Export(pb.ExportRequest(table=name), timeout=TRANSFER_TIMEOUT,
                                      metadata=self._metadata)
        first = next(responses)
        config = replica_config(table_config_from_proto(first.config))
        self._drop_if_incompatible(config)
        rows = self.store.import_table(name, self._export_chunks(first, responses), mode="replace", config=config)
        self.stats.counters["rows_applied"] += rows

    def _drop_if_incompatible(self, config: TableConfig) -> None:
        """A local table whose rows have another shape than the primary's (recreated there) goes first."""
        try:
            local = self.store.describe_table(config.name)
        except TableNotFound:
            return
        if (local.dim, local.dtype, local.state_dim) != (config.dim, config.dtype, config.state_dim):
            self.store.drop_table(config.name)

    def _export_chunks(self, first: pb.ExportChunk, rest: Iterator[pb.ExportChunk]) -> Iterator[RowChunk]:
        for message in itertools.chain([first], rest):
            if self._stop.is_set():
                rest.cancel()
                raise _Stopped()
            ids = decode_ids(message.ids, "ids")
            if len(ids):
                yield RowChunk(ids, decode_tensor(message.weights, "weights"), decode_tensor(message.state, "state"),
                               decode_tensor(message.meta, "meta"))

    def _ensure_table(self, name: str) -> None:
        """A table created on the primary after the bootstrap: create it here from its config."""
        try:
            self.store.describe_table(name)
        except TableNotFound:
            response = self._stub.DescribeTable(pb.DescribeTableRequest(table=name), timeout=CALL_TIMEOUT,
                                                metadata=self._metadata)
            self.store.create_table(replica_config(table_config_from_proto(response.config)))

    # --- following ---------------------------------------------------------------

    def _apply_stream(self, responses: Iterator[pb.SubscribeResponse]) -> None:
        last_checkpoint = time.monotonic()
        for message in responses:
            if self._stop.is_set():
                return
            if message.table_dropped:
                self._drop(message.table)
            elif message.table:
                self._apply_rows(message)
            if message.batch_end:
                self._batch_done(message)
                if time.monotonic() - last_checkpoint >= self.config.checkpoint_seconds:
                    self._checkpoint()
                    last_checkpoint = time.monotonic()

    def _apply_rows(self, message: pb.SubscribeResponse) -> None:
        self._ensure_table(message.table)
        ids = decode_ids(message.ids, "ids")
        if len(ids):
            state = decode_tensor(message.state, "state") if message.HasField("state") else None
            self.store.update(message.table, ids, decode_tensor(message.weights, "weights"), state)
            self.stats.counters["rows_applied"] += len(ids)
        tombstones = decode_ids(message.tombstones, "tombstones")
        if len(tombstones):
            self.store.delete(message.table, tombstones)
            self.stats.counters["tombstones_applied"] += len(tombstones)

    def _drop(self, name: str) -> None:
        try:
            self.store.drop_table(name)
        except TableNotFound:
            pass

    def _batch_done(self, message: pb.SubscribeResponse) -> None:
        stats = self.stats
        self._position = Position(message.feed_id or self._position.feed_id, message.sequence)
        stats.applied_sequence = message.sequence
        stats.head_sequence = max(message.head_sequence, message.sequence)
        if message.oldest_change_time:
            stats.lag_seconds = max(0.0, time.time() - message.oldest_change_time)
        elif message.sequence >= message.head_sequence:
            stats.lag_seconds = 0.0

    def _checkpoint(self) -> None:
        """Make every applied row durable, then record the sequence they were applied up to."""
        position = self._position
        if position is None or position == self._checkpointed:
            return
        self.store.flush()
        self._positions.save(position)
        self._checkpointed = position


def replica_config(config: TableConfig) -> TableConfig:
    """The primary's table config without eviction rules (the primary evicts and sends tombstones), its
    cache on a device of this machine (`placed_here`: a primary's GPU this replica lacks -> host memory)."""
    return placed_here(dataclasses.replace(config, eviction=EvictionConfig()))


class _Stopped(Exception):
    """The follower was asked to stop in the middle of a bootstrap (the import is aborted)."""
