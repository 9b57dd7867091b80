"""Bearer-token authentication and TLS credentials of the server.

The token is compared in constant time (`hmac.compare_digest`) on every RPC but
the health service's, which probes (Kubernetes, load balancers) call without
credentials. A refused call gets UNAUTHENTICATED before any handler runs, so it
changes nothing. TLS needs `tls_cert` and `tls_key`; `tls_client_ca` makes it
mutual: the handshake fails for clients without a certificate signed by that CA.
"""
from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc

from kvstore.errors import InvalidArgument

from .config import ServerConfig

AUTH_METADATA = "authorization"
BEARER = "Bearer "
OPEN_METHODS = ("/grpc.health.v1.Health/",)     # callable without a token


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
    """TLS (or mutual TLS) credentials from the config's PEM files; None without TLS."""
    if not config.tls:
        return None
    pair = (read_secret(config.tls_key, "tls_key"), read_secret(config.tls_cert, "tls_cert"))
    client_ca = read_secret(config.tls_client_ca, "tls_client_ca") if config.tls_client_ca else None
    try:
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)
    except (ValueError, RuntimeError) as exc:
        raise InvalidArgument(f"tls_cert: unusable certificate or key: {exc}") from None


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str, on_refused: Callable[[str], None] | None = None):
        self._expected = (BEARER + token).encode()
        self._on_refused = on_refused or (lambda method: None)

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(OPEN_METHODS):
            return continuation(details)
        given = next((value for key, value in details.invocation_metadata or () if key == AUTH_METADATA), None)
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:                 # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        self._on_refused(details.method.rsplit("/", 1)[-1])
        message = (f"{AUTH_METADATA}: missing bearer token" if given is None
                   else f"{AUTH_METADATA}: invalid bearer token")
        return _refusal(handler, message)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts; the request is never read."""

    def refuse(request, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
