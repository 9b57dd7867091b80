"""Bearer-token authentication and TLS credentials of the server.

The token is compared in constant time (`hmac.compare_digest`) on every RPC but
the health service's, which probes (Kubernetes, load balancers) call without
credentials. A refused call gets UNAUTHENTICATED before any handler runs, so it
changes nothing. TLS needs `tls_cert` and `tls_key`; `tls_client_ca` makes it
mutual: the handshake fails for clients without a certificate signed by that CA.
Certificate files are re-read when they change (renewals need no restart).
"""
from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable

import grpc

from kvstore.errors import InvalidArgument

from .config import ServerConfig

AUTH_METADATA = "authorization"
BEARER = "Bearer "
OPEN_METHODS = ("/grpc.health.v1.Health/",)     # callable without a token
log = logging.getLogger("kvstore_server")


def read_secret(path: str, key: str) -> bytes:
    """The bytes of a credential file; errors name the config key, never the contents."""
    try:
        with open(path, "rb") as handle:
            content = handle.read()
    except OSError as exc:
        raise InvalidArgument(f"{key}: cannot read {path}: {exc.strerror}") from None
    if not content.strip():
        raise InvalidArgument(f"{key}: {path} is empty")
    return content


def read_token(path: str) -> str:
    token = read_secret(path, "auth_token_file").decode("utf-8", "replace").strip()
    if any(c.isspace() for c in token):
        raise InvalidArgument("auth_token_file: the token must be one line without spaces")
    return token


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials from the config's PEM files; None without TLS.
    Renewed files are picked up by the next handshake, without a restart."""
    if not config.tls:
        return None
    reloader = _CertificateReloader(config)
    try:
        return grpc.dynamic_ssl_server_credentials(reloader.load(), reloader,
                                                   require_client_authentication=bool(config.tls_client_ca))
    except (ValueError, RuntimeError) as exc:
        raise InvalidArgument(f"tls_cert: unusable certificate or key: {exc}") from None


class _CertificateReloader:
    """Called by gRPC before each handshake: a new certificate configuration when a file changed."""

    def __init__(self, config: ServerConfig):
        self._files = {key: getattr(config, key) for key in ("tls_cert", "tls_key", "tls_client_ca")
                       if getattr(config, key)}
        self._seen = self._stamps()

    def _stamps(self) -> tuple:
        try:
            return tuple((os.stat(path).st_mtime_ns, os.stat(path).st_size) for path in self._files.values())
        except OSError:
            return ()

    def load(self):
        pem = {key: read_secret(path, key) for key, path in self._files.items()}
        return grpc.ssl_server_certificate_configuration([(pem["tls_key"], pem["tls_cert"])],
                                                         root_certificates=pem.get("tls_client_ca"))

    def __call__(self):
        stamps = self._stamps()
        if not stamps or stamps == self._seen:
            return None                       # unchanged, or mid-rotation: keep serving the current one
        try:
            fresh = self.load()
        except InvalidArgument:
            return None
        self._seen = stamps
        log.info("TLS certificate files changed: reloaded for new connections")
        return fresh


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str, on_refused: Callable[[str], None] | None = None):
        self._expected = (BEARER + token).encode()
        self._on_refused = on_refused or (lambda method: None)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler                  # unknown method: grpc answers UNIMPLEMENTED
        given = next((value for key, value in details.invocation_metadata or () if key == AUTH_METADATA), None)
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._expected):
            return handler
        self._on_refused(details.method.rsplit("/", 1)[-1])
        message = (f"{AUTH_METADATA}: missing bearer token" if given is None
                   else f"{AUTH_METADATA}: invalid bearer token")
        return _refusal(handler, message)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts; the request is never read."""

    async def refuse(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - never reached: abort raises

    options = {"request_deserializer": None, "response_serializer": None}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **options)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **options)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **options)
    return grpc.unary_unary_rpc_method_handler(refuse, **options)
