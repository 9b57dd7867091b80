"""How the client authenticates: a bearer token on every call, TLS or mutual TLS on the channel.

The token travels as `authorization: Bearer <token>` metadata, added by a client
interceptor, so it works on TLS and on plaintext loopback channels alike (gRPC's
own call credentials refuse plaintext). Send tokens over plaintext only on loopback.
"""
from __future__ import annotations

import collections
import ipaddress

import grpc

from .errors import InvalidArgumentError

AUTH_METADATA = "authorization"


def read_file(path: str, field: str) -> bytes:
    """A credential file's bytes; errors name the option, never the contents."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise InvalidArgumentError(message=f"{field}: cannot read {path}: {exc.strerror}") from None


def open_channel(address: str, options: list[tuple[str, object]], token: str | None = None,
                 root_certificates: bytes | None = None, certificate_chain: bytes | None = None,
                 private_key: bytes | None = None, tls: bool | None = None, insecure: bool = False) -> grpc.Channel:
    """A channel to `address`: TLS when `tls` or any certificate is given (system roots without
    `root_certificates`), plaintext otherwise; every call carries `token` when given. A token is
    never sent in clear to another machine unless `insecure` says so."""
    if (certificate_chain is None) != (private_key is None):
        raise InvalidArgumentError(message="certificate_chain: a client certificate needs its private_key")
    if tls is None:
        tls = any(x is not None for x in (root_certificates, certificate_chain))
    if token and not tls and not insecure and not is_loopback_address(address):
        raise InvalidArgumentError(message=f"token: refusing to send the bearer token in clear to {address}; "
                                           "use TLS (tls=True or root_certificates; --tls or --tls-ca) or say "
                                           "insecure=True (--insecure)")
    if tls:
        credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if token:
        if any(c.isspace() for c in token.strip()):
            raise InvalidArgumentError(message="token: must be one line without spaces")
        channel = grpc.intercept_channel(channel, _BearerToken(token.strip()))
    return channel


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._header = (AUTH_METADATA, f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


def is_loopback_address(address: str) -> bool:
    """Whether `host:port` names this machine (localhost, 127.0.0.0/8, [::1], a unix socket)."""
    if address.startswith("unix:"):
        return True
    host = (address.rpartition(":")[0] or address).strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
