"""One running server: the Store, the asyncio gRPC server with health and reflection, metrics.

No thread per call or stream: calls are coroutines on one event loop, store
work runs in a bounded pool (`rpc.StoreWork`), so open streams and lease holders
cost no thread and health is answered whatever else is open.

Shutdown order matters: health goes NOT_SERVING, new calls are answered
UNAVAILABLE, in-flight calls finish within the grace period (the rest are
cancelled), and only then is the Store closed (which flushes dirty write-back rows).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as reflection_grpc
from kvstore_proto.tensors import InPlaceImportRequest, read_train_request
from kvstore_proto.v1 import kvstore_pb2 as pb

from kvstore import Store, host_kernels, row_threads
from kvstore.devices import missing_device
from kvstore.errors import FailedPrecondition
from kvstore.thread_names import os_named

from .config import ServerConfig
from .data_paths import check_data_dir
from .doorbell import Doorbell
from .health_watch import BoundedHealthServicer
from .metrics import Metrics
from .replica_mode import (
    changefeed_config,
    primary_credentials,
    replica_follower,
    replica_interceptors,
    start_replication,
    stop_replication,
)
from .rpc import CallGate, StoreWork, bind, default_workers
from .security import TokenAuthInterceptor, read_token, server_credentials
from .service import EmbeddingStoreService

log = logging.getLogger("kvstore_server")
SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingStore"]
SERVICE_NAME = SERVICE.full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"   # the same messages as v1alpha, another name
PRESERIALIZED = {"Lookup", "Export", "Train"}   # methods whose handlers yield wire bytes (tensors.encode_message)
IN_PLACE = {"Import": InPlaceImportRequest, "Train": read_train_request}   # read in place: rows not copied out
_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
          (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def add_service(servicer: EmbeddingStoreService, server: grpc.aio.Server, gate: CallGate) -> None:
    """Register every method from the descriptor with raw bytes in (the service parses them, see
    `rpc.bind`); responses of PRESERIALIZED methods pass through as bytes."""
    handlers = {}
    for method in SERVICE.methods:
        behavior = bind(method, getattr(servicer, method.name), gate, servicer.metrics, IN_PLACE.get(method.name))
        serializer = None if method.name in PRESERIALIZED else _serializer(method)
        handlers[method.name] = _KINDS[method.client_streaming, method.server_streaming](
            behavior, request_deserializer=None, response_serializer=serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def _serializer(method):
    from google.protobuf.message_factory import GetMessageClass

    return GetMessageClass(method.output_type).SerializeToString


def add_reflection(server: grpc.aio.Server, names: tuple[str, ...]) -> None:
    """Server reflection under both names current tools ask for: v1 and v1alpha."""
    servicer = reflection.aio.ReflectionServicer((*names, reflection.SERVICE_NAME, REFLECTION_V1))
    reflection_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        REFLECTION_V1, {"ServerReflectionInfo": v1}),))


def _warm_host_kernels() -> None:
    """Load the host cache's compiled loops beside the store's opening, so that the first lookup
    does not wait about a second for them (a lookup that comes sooner waits for this)."""
    try:
        host_kernels.warm()
    except Exception:                      # the first lookup will meet the same error and report it
        log.exception("could not load the host cache's compiled loops")


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class KVStoreServer:
    def __init__(self, config: ServerConfig, metrics: Metrics | None = None,
                 store_clock: Callable[[], float] = time.time):
        self.config = config
        self.store_clock = store_clock        # the Store's clock (row access times, TTL): tests pass their own
        self.metrics = metrics or Metrics()
        self.store: Store | None = None
        self.service: EmbeddingStoreService | None = None
        self.port = 0
        self.work = StoreWork(config.max_workers or default_workers())
        row_threads.set_threads(config.host_threads)
        self._grpc: grpc.aio.Server | None = None
        self._health = BoundedHealthServicer(config.max_health_watches_per_peer)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gate: CallGate | None = None
        self._lease_task: asyncio.Task | None = None
        self._budget_task: asyncio.Task | None = None
        self._metrics_http = None
        self._doorbell: Doorbell | None = None
        self._follower = None          # replica mode: the thread following the primary
        self._has_copy = True          # False: a replica before its first copy of the primary
        self._fault: str | None = None  # a storage fault not yet recovered from

    async def start(self) -> int:
        """Open the store, bind and start serving; returns the bound port."""
        config = self.config
        self._loop = asyncio.get_running_loop()
        credentials = server_credentials(config)      # bad TLS or token files fail before the store opens
        missing = missing_device(config.cache_device)  # ... and so does a default device this machine lacks
        if missing:
            raise FailedPrecondition(f"cache_device: {config.cache_device!r} is not available ({missing})")
        primary_credentials(config)                   # a replica: its TLS files, no token in clear to the primary
        interceptors = []
        token = read_token(config.auth_token_file) if config.auth_token_file else None   # read once, used thrice
        if token:
            refused = self.metrics.auth_failures
            interceptors.append(TokenAuthInterceptor(token, on_refused=lambda method: refused.labels(method).inc()))
        interceptors += replica_interceptors(config)
        await asyncio.to_thread(check_data_dir, config.data_dir)    # no link planted in it leads outside
        threading.Thread(target=os_named(_warm_host_kernels), name="kvstore-warm", daemon=True).start()
        self.store = await asyncio.to_thread(Store, config.data_dir, rocks=config.rocksdb, sweeper=config.sweeper,
                                             changefeed=changefeed_config(config), clock=self.store_clock)
        self._gate = CallGate(config.max_concurrent_rpcs, config.retry_after_ms)
        self._grpc = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ])
        self.service = EmbeddingStoreService(self.store, config, self.metrics, self.work)
        add_service(self.service, self._grpc, self._gate)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        add_reflection(self._grpc, (SERVICE_NAME, health.SERVICE_NAME))
        self.port = self._bind(credentials)
        if config.metrics_port:
            self.metrics.watch(self.store, config.data_dir)
            tls = (config.tls_cert, config.tls_key) if config.metrics_tls else None
            self._metrics_http = self.metrics.serve(config.metrics_host, config.metrics_port,
                                                    token if config.metrics_auth else None, tls)
        await self._grpc.start()
        if config.same_host:
            await self._ring_doorbell(token)
        interval = min(max(config.lease_seconds / 4, 0.01), 5.0)
        self._lease_task = asyncio.create_task(self.service.expire_forever(interval))
        self._budget_task = asyncio.create_task(self.service.data_budget.refresh_forever(self.work))
        self._follower = replica_follower(self)
        serving = self._follower is None or self._follower.resumable     # a new replica: once its first copy is made
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)
        self._has_copy = serving
        self.store.on_fault(self._storage_fault)          # NOT_SERVING until a fault clears
        start_replication(self._follower)
        return self.port

    async def _ring_doorbell(self, token: str | None) -> None:
        """Also take same-host lookups on a Unix socket (doorbell.py); without one (not Linux), gRPC only."""
        doorbell = Doorbell(self.service, self._gate, self.metrics, token)
        try:
            self.service.doorbell = await doorbell.start()
            self._doorbell = doorbell
        except OSError as exc:
            log.warning("same-host lookups go over gRPC only: no doorbell socket (%s)", exc)

    def _bind(self, credentials) -> int:
        address = grpc_address(self.config.host, self.config.port)
        try:
            if credentials is None:
                return self._grpc.add_insecure_port(address)
            return self._grpc.add_secure_port(address, credentials)
        except RuntimeError as exc:
            self.store.close()
            raise FailedPrecondition(f"port: cannot bind {address}: {exc}") from None

    def _storage_fault(self, fault: str | None) -> None:
        self._fault = fault
        self._publish_health()

    def set_serving(self, serving: bool) -> None:
        """A replica has (or lost) a copy to serve; from any thread. Health is SERVING only with a
        copy and no storage fault."""
        self._has_copy = serving
        self._publish_health()

    def _publish_health(self) -> None:
        serving = self._has_copy and self._fault is None
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            asyncio.run_coroutine_threadsafe(self._health.set(service, status), self._loop)

    async def stop(self) -> None:
        """Drain and close; safe to call once after start. New calls are refused before health
        says NOT_SERVING, so a client that saw NOT_SERVING is never served a new call (the steps
        between, closing the doorbell and ending replication streams, take time)."""
        if self._gate is not None:
            self._gate.refuse_new()
        await self._health.enter_graceful_shutdown()
        if self._doorbell is not None:
            await self._doorbell.close()                # no new same-host connections; calls drain below
        await asyncio.to_thread(stop_replication, self, self._follower)   # open Subscribe streams end first
        if self._gate is not None and not await self._gate.drain(self.config.grace_seconds):
            log.warning("calls still running after the %ss grace period are cancelled", self.config.grace_seconds)
        if self._grpc is not None:
            await self._grpc.stop(0)
        if self.service is not None and self.service.segments is not None:
            self.service.segments.close()               # clients' shared-memory segments unmapped
            self.service.device_buffers.close()         # and their GPU buffers closed
        for task in (self._lease_task, self._budget_task):
            if task is not None:
                task.cancel()
        await asyncio.to_thread(self.work.shutdown)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        if self._metrics_http is not None:
            http_server, _thread = self._metrics_http
            http_server.shutdown()
        log.info("kvstore-server stopped")
