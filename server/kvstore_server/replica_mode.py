"""What replica mode adds to a server: write refusal, the follower, its metrics; and the hooks
`server.py` calls (`replica_interceptors`, `start_replication`, `stop_replication`)."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
from google.protobuf.message import DecodeError
from kvstore_proto.v1 import kvstore_pb2 as pb
from prometheus_client.core import Metric

from kvstore.changefeed import ChangeFeedConfig
from kvstore.errors import FailedPrecondition

from .config import ServerConfig
from .errors import REASON_KEY
from .metrics import _Families
from .replica import Follower
from .security import is_loopback, read_secret, read_token

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingStore"].full_name
SERVICE_PREFIX = f"/{SERVICE_NAME}/"
WRITE_METHODS = frozenset({"CreateTable", "DropTable", "Update", "Delete", "ApplyGradients", "Prefetch", "Import",
                           "ImportChain", "RestoreSnapshot", "Evict", "RestoreRows", "SharedUpdate",
                           "SharedApplyGradients", "Train"})     # Train: a trainer's steps write rows
_INSERTING = (pb.ON_MISS_UNSPECIFIED, pb.ON_MISS_INIT_INSERT)


class ReadOnlyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every write with FAILED_PRECONDITION naming the primary; lookups never insert rows."""

    def __init__(self, primary: str):
        self.message = (f"method: this server is a read-only replica of {primary}; send writes to the primary")

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler                  # unknown method: grpc answers UNIMPLEMENTED
        method = details.method[len(SERVICE_PREFIX):]
        if method in WRITE_METHODS:
            return self._refusal(handler)
        if method == "Lookup":
            lookup = handler.stream_stream

            async def lookup_without_insert(requests, context):
                async for response in lookup(_no_insert(requests), context):
                    yield response

            return handler._replace(stream_stream=lookup_without_insert)
        return handler

    def _refusal(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """A handler of the same shape as `handler` (unary, client-streamed, or a stream both
        ways as Train is) that only aborts; the request is never read."""

        async def refuse(request, context: grpc.aio.ServicerContext):
            context.set_trailing_metadata(((REASON_KEY, "read_only_replica"),))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.message)

        async def refuse_stream(requests, context: grpc.aio.ServicerContext):
            await refuse(requests, context)
            yield b""                                 # never reached: makes this a response stream

        options = {"request_deserializer": None, "response_serializer": None}
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse_stream, **options)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse, **options)
        return grpc.unary_unary_rpc_method_handler(refuse, **options)


async def _no_insert(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """init_insert (the default) becomes init: the same deterministic row, not stored on the replica.
    Requests arrive as bytes (the service parses them): a message that does not parse passes unchanged,
    for the service to refuse with INVALID_ARGUMENT."""
    async for raw in requests:
        try:
            request = pb.LookupRequest.FromString(raw)
        except (DecodeError, RuntimeError, ValueError):
            yield raw
            continue
        if request.on_miss in _INSERTING:
            request.on_miss = pb.ON_MISS_INIT
            raw = request.SerializeToString()
        yield raw


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


def primary_credentials(config: ServerConfig) -> grpc.ChannelCredentials | None:
    """How a replica connects to its primary: TLS with `replication.tls_ca` (and the client certificate of
    `replication.tls_cert`/`tls_key` for mutual TLS), else plaintext. Like the client, it never sends the
    token in clear to another machine unless `replication.insecure` says so: such a replica refuses to start."""
    replication = config.replication
    if not config.replica_of or not replication.tls_ca:
        primary_host = config.replica_of.rpartition(":")[0] or config.replica_of
        if config.replica_of and config.auth_token_file and not replication.insecure \
                and not is_loopback(primary_host):
            raise FailedPrecondition(
                f"replication.tls_ca: refusing to send the bearer token in clear to the primary {config.replica_of}; "
                "set replication.tls_ca (TLS to the primary) or replication.insecure: true")
        return None
    ca = read_secret(replication.tls_ca, "replication.tls_ca")
    cert = read_secret(replication.tls_cert, "replication.tls_cert") if replication.tls_cert else None
    key = read_secret(replication.tls_key, "replication.tls_key") if replication.tls_key else None
    return grpc.ssl_channel_credentials(ca, key, cert)


def replica_follower(server) -> Follower | None:
    """The follower of the primary (replica mode only; started with `start_replication`); its metrics
    join the server's registry. It reports SERVING through `server.set_serving` once bootstrapped."""
    config = server.config
    if not config.replica_of:
        return None
    token = read_token(config.auth_token_file) if config.auth_token_file else None
    follower = Follower(server.store, config.replica_of, config.replication, token, config.max_message_bytes,
                        on_bootstrapped=lambda: server.set_serving(True), credentials=primary_credentials(config))
    server.metrics.registry.register(ReplicaCollector(follower))
    return follower


def start_replication(follower: Follower | None) -> None:
    if follower is not None:
        follower.start()


def stop_replication(server, follower: Follower | None) -> None:
    """Before gRPC drains: end open Subscribe streams (they would hold the drain) and stop following."""
    if server.store is not None:
        server.store.changes.end_subscriptions()
    if follower is not None:
        follower.stop()
