"""One running server: the Store, the gRPC server with health and reflection, metrics.

Shutdown order matters: health goes NOT_SERVING, gRPC stops accepting and
drains in-flight calls within the grace period, the handler threads finish,
and only then is the Store closed (which flushes dirty write-back rows).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kvstore_proto.v1 import kvstore_pb2 as pb

from kvstore import Store
from kvstore.errors import FailedPrecondition

from .config import ServerConfig
from .logs import RequestIdInterceptor
from .metrics import Metrics
from .replica_mode import changefeed_config, replica_interceptors, start_replication, stop_replication
from .security import TokenAuthInterceptor, read_token, server_credentials
from .service import EmbeddingStoreService

log = logging.getLogger("kvstore_server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingStore"].full_name


PRESERIALIZED = {"Lookup"}   # methods whose handlers yield wire bytes (see encode_lookup_response)
_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
          (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def add_service(servicer: EmbeddingStoreService, server: grpc.Server) -> None:
    """Register the service as the generated `add_EmbeddingStoreServicer_to_server` does, built
    from the descriptor, except that the responses of PRESERIALIZED methods pass through as bytes."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["EmbeddingStore"].methods:
        request = GetMessageClass(method.input_type)
        response = GetMessageClass(method.output_type)
        kind = _KINDS[method.client_streaming, method.server_streaming]
        handlers[method.name] = kind(
            getattr(servicer, method.name), request_deserializer=request.FromString,
            response_serializer=bytes if method.name in PRESERIALIZED else response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class KVStoreServer:
    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.store: Store | None = None
        self.port = 0
        self._executor = ThreadPoolExecutor(config.max_workers, thread_name_prefix="kvstore-rpc")
        self._grpc: grpc.Server | None = None
        self._health = health.HealthServicer()
        self._metrics_http = None
        self._follower = None          # replica mode: the thread following the primary

    def start(self) -> int:
        """Open the store, bind and start serving; returns the bound port."""
        config = self.config
        credentials = server_credentials(config)      # bad TLS or token files fail before the store opens
        interceptors = [RequestIdInterceptor()]
        if config.auth_token_file:
            refused = self.metrics.auth_failures
            interceptors.append(TokenAuthInterceptor(read_token(config.auth_token_file),
                                                     on_refused=lambda method: refused.labels(method).inc()))
        interceptors += replica_interceptors(config)
        self.store = Store(config.data_dir, rocks=config.rocksdb, sweeper=config.sweeper,
                           changefeed=changefeed_config(config))
        self._grpc = grpc.server(
            self._executor,
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_concurrent_streams", config.max_concurrent_streams),
            ],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        add_service(EmbeddingStoreService(self.store, config, self.metrics), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )
        try:
            address = grpc_address(config.host, config.port)
            if credentials is None:
                self.port = self._grpc.add_insecure_port(address)
            else:
                self.port = self._grpc.add_secure_port(address, credentials)
        except RuntimeError as exc:
            self.store.close()
            raise FailedPrecondition(f"port: cannot bind {grpc_address(config.host, config.port)}: {exc}") from None
        if config.metrics_port:
            self.metrics.watch(self.store, config.data_dir)
            self._metrics_http = self.metrics.serve(config.host, config.metrics_port)
        self._grpc.start()
        for service in ("", SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._follower = start_replication(self, self._health)   # replica: NOT_SERVING until its first copy
        return self.port

    def stop(self) -> None:
        """Drain and close; safe to call once after start."""
        self._health.enter_graceful_shutdown()
        stop_replication(self, self._follower)
        if self._grpc is not None:
            self._grpc.stop(self.config.grace_seconds).wait()
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.store is not None:
            self.store.close()
        if self._metrics_http is not None:
            http_server, _thread = self._metrics_http
            http_server.shutdown()
        log.info("kvstore-server stopped")
