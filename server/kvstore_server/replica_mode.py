"""What replica mode adds to a server: write refusal, the follower, its metrics; and the hooks
`server.py` calls (`replica_interceptors`, `start_replication`, `stop_replication`)."""
from __future__ import annotations

from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2
from kvstore_proto.v1 import kvstore_pb2 as pb
from prometheus_client.core import Metric

from kvstore.changefeed import ChangeFeedConfig

from .config import ServerConfig
from .errors import REASON_KEY
from .metrics import _Families
from .replica import Follower
from .security import read_token

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingStore"].full_name
SERVICE_PREFIX = f"/{SERVICE_NAME}/"
WRITE_METHODS = frozenset({"CreateTable", "DropTable", "Update", "Delete", "ApplyGradients", "Prefetch", "Import",
                           "ImportChain", "RestoreSnapshot", "Evict", "RestoreRows"})
_INSERTING = (pb.ON_MISS_UNSPECIFIED, pb.ON_MISS_INIT_INSERT)


class ReadOnlyInterceptor(grpc.ServerInterceptor):
    """Refuses every write with FAILED_PRECONDITION naming the primary; lookups never insert rows."""

    def __init__(self, primary: str):
        self.message = (f"method: this server is a read-only replica of {primary}; send writes to the primary")

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        method = details.method[len(SERVICE_PREFIX):]
        if method in WRITE_METHODS:
            kind = "stream_unary" if handler.request_streaming else "unary_unary"
            return handler._replace(**{kind: self._refuse})
        if method == "Lookup":
            lookup = handler.stream_stream
            return handler._replace(stream_stream=lambda requests, context: lookup(_no_insert(requests), context))
        return handler

    def _refuse(self, request, context: grpc.ServicerContext):
        context.set_trailing_metadata(((REASON_KEY, "read_only_replica"),))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.message)


def _no_insert(requests: Iterator[pb.LookupRequest]) -> Iterator[pb.LookupRequest]:
    """init_insert (the default) becomes init: the same deterministic row, not stored on the replica."""
    for request in requests:
        if request.on_miss in _INSERTING:
            request.on_miss = pb.ON_MISS_INIT
        yield request


class ReplicaCollector:
    """The follower's position, lag and counters at every scrape."""

    def __init__(self, follower: Follower):
        self.follower = follower

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self.follower.stats
        out = _Families()
        primary = (self.follower.primary,)
        out.add("kvstore_replica_lag_seconds", primary, stats.lag_seconds)
        out.add("kvstore_replica_lag_sequences", primary, max(0, stats.head_sequence - stats.applied_sequence))
        out.add("kvstore_replica_applied_sequence", primary, stats.applied_sequence)
        out.add("kvstore_replica_connected", primary, float(stats.connected))
        out.add("kvstore_replica_bootstrapped", primary, float(stats.bootstrapped))
        out.add("kvstore_replica_rows_applied", primary, stats.counters["rows_applied"])
        out.add("kvstore_replica_tombstones_applied", primary, stats.counters["tombstones_applied"])
        for reason in ("initial", "window", "error"):
            out.add("kvstore_replica_bootstraps", (*primary, reason), stats.counters[f"bootstraps_{reason}"])
        yield from out.metrics()


# --- hooks called by server.py -------------------------------------------------------


def changefeed_config(config: ServerConfig) -> ChangeFeedConfig:
    return ChangeFeedConfig(window_rows=config.replication.window_rows)


def replica_interceptors(config: ServerConfig) -> list[grpc.ServerInterceptor]:
    return [ReadOnlyInterceptor(config.replica_of)] if config.replica_of else []


def start_replication(server, health) -> Follower | None:
    """Start following the primary (replica mode only); its metrics join the server's registry. A replica
    without a saved position reports NOT_SERVING on `health` until its first bootstrap completed."""
    config = server.config
    if not config.replica_of:
        return None
    token = read_token(config.auth_token_file) if config.auth_token_file else None

    def serving(status) -> None:
        for service in ("", SERVICE_NAME):
            health.set(service, status)

    follower = Follower(server.store, config.replica_of, config.replication, token, config.max_message_bytes,
                        on_bootstrapped=lambda: serving(health_pb2.HealthCheckResponse.SERVING))
    if not follower.resumable:
        serving(health_pb2.HealthCheckResponse.NOT_SERVING)
    server.metrics.registry.register(ReplicaCollector(follower))
    follower.start()
    return follower


def stop_replication(server, follower: Follower | None) -> None:
    """Before gRPC drains: end open Subscribe streams (they would hold the drain) and stop following."""
    if server.store is not None:
        server.store.changes.end_subscriptions()
    if follower is not None:
        follower.stop()

