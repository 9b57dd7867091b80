"""Bearer-token authentication and TLS credentials of the server.

The token is compared in constant time (`hmac.compare_digest`) on every RPC but
the health service's, which probes (Kubernetes, load balancers) call without
credentials. A refused call gets UNAUTHENTICATED before any handler runs, so it
changes nothing. TLS needs `tls_cert` and `tls_key`; `tls_client_ca` makes it
mutual: the handshake fails for clients without a certificate signed by that CA.
Certificate files are re-read when they change (renewals need no restart).
"""
from __future__ import annotations

import datetime
import hmac
import ipaddress
import logging
import os
import stat
import time
from collections.abc import Callable

import grpc

from kvstore.errors import InvalidArgument

from .config import ServerConfig
from .health_watch import peer_address

MIN_TOKEN_BYTES = 16                             # shorter tokens are guessable
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
    """The bearer token of `auth_token_file`, which must be private to the server (see
    `check_private_file`) and at least MIN_TOKEN_BYTES long."""
    check_private_file(path, "auth_token_file")
    token = read_secret(path, "auth_token_file").decode("utf-8", "replace").strip()
    if any(c.isspace() for c in token):
        raise InvalidArgument("auth_token_file: the token must be one line without spaces")
    if len(token.encode()) < MIN_TOKEN_BYTES:
        raise InvalidArgument(f"auth_token_file: the token is {len(token.encode())} bytes; "
                              f"at least {MIN_TOKEN_BYTES} are needed (e.g. `openssl rand -hex 32`)")
    return token


def check_private_file(path: str, key: str) -> None:
    """Refuse a secret file that other local users could read or replace: it must be a regular
    file owned by the server's user (or root), with no access for others and no group write.
    Group read is accepted only for one of the server's own groups, which is how Kubernetes
    mounts a Secret with `fsGroup`. A symbolic link is followed only when it stays inside the
    file's own directory (Secret volumes link `token -> ..data/token`)."""
    directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    target = os.path.realpath(path)
    if os.path.islink(path) and os.path.commonpath([directory, target]) != directory:
        raise InvalidArgument(f"{key}: {path} is a symbolic link leading outside its directory")
    try:
        info = os.stat(target)
    except OSError as exc:
        raise InvalidArgument(f"{key}: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument(f"{key}: {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid not in (os.geteuid(), 0):
        raise InvalidArgument(f"{key}: {path} belongs to another user (uid {info.st_uid}); "
                              "it must be owned by the server's user")
    own_groups = {os.getegid(), *os.getgroups()}
    if mode & 0o027 or (mode & 0o040 and info.st_gid not in own_groups):
        raise InvalidArgument(f"{key}: {path} is accessible to other users (mode {mode:04o}); "
                              f"make it private: chmod 600 {path}")


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials from the config's PEM files; None without TLS.
    Renewed files are picked up by the next handshake, without a restart."""
    if not config.tls:
        return None
    check_certificates(config)
    reloader = _CertificateReloader(config)
    try:
        return grpc.dynamic_ssl_server_credentials(reloader.load(), reloader,
                                                   require_client_authentication=bool(config.tls_client_ca))
    except (ValueError, RuntimeError) as exc:
        raise InvalidArgument(f"tls_cert: unusable certificate or key: {exc}") from None


def check_certificates(config: ServerConfig, now: datetime.datetime | None = None) -> None:
    """Refuse to start with TLS files that would fail every handshake later: PEM that does not
    parse, a key that does not belong to the certificate, a certificate outside its validity."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        chain = x509.load_pem_x509_certificates(read_secret(config.tls_cert, "tls_cert"))
    except ValueError:
        raise InvalidArgument(f"tls_cert: {config.tls_cert} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(read_secret(config.tls_key, "tls_key"), password=None)
    except (ValueError, TypeError):
        raise InvalidArgument(f"tls_key: {config.tls_key} holds no unencrypted PEM private key") from None
    leaf = chain[0]
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*der) != key.public_key().public_bytes(*der):
        raise InvalidArgument(f"tls_key: {config.tls_key} is not the key of the certificate in {config.tls_cert}")
    if now > leaf.not_valid_after_utc:
        raise InvalidArgument(f"tls_cert: the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if now < leaf.not_valid_before_utc:
        raise InvalidArgument(f"tls_cert: the certificate is not valid before "
                              f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if config.tls_client_ca:
        try:
            x509.load_pem_x509_certificates(read_secret(config.tls_client_ca, "tls_client_ca"))
        except ValueError:
            raise InvalidArgument(f"tls_client_ca: {config.tls_client_ca} holds no PEM certificate") from None


def exposure_warnings(config: ServerConfig) -> list[str]:
    """What an operator should hear at start: a bind others can reach without a token, a token
    that would travel in clear, a reachable metrics page anyone may read."""
    warnings = []
    if config.metrics_port and not is_loopback(config.metrics_host) and not config.metrics_auth:
        warnings.append(f"metrics_host {config.metrics_host} is reachable from other machines without "
                        "metrics_auth: anyone can read table names, row counts and disk figures")
    if is_loopback(config.host):
        return warnings
    if not config.auth_token_file:
        warnings.append(f"host {config.host} is reachable from other machines and auth_token_file is not set: "
                        "anyone who reaches the port can read, write and drop every table")
    if config.auth_token_file and not config.tls:
        warnings.append(f"host {config.host} is reachable from other machines without TLS: "
                        "the bearer token travels in clear (set tls_cert and tls_key)")
    return warnings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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


class RefusalLog:
    """Logs refused calls with the caller's address, at most one line per address every
    `interval` seconds; the next line says how many were left out meanwhile. A client
    hammering the port with a wrong token costs a few lines a minute, not gigabytes."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.interval, self.clock = interval, clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def refused(self, peer: str, method: str, reason: str) -> bool:
        """Record one refusal; True when it was logged."""
        address, now = peer_address(peer), self.clock()
        if now - self._last.get(address, -self.interval) < self.interval:
            self._skipped[address] = self._skipped.get(address, 0) + 1
            return False
        if len(self._last) > 10000:                 # forget quiet addresses: bounded memory
            self._last = {a: t for a, t in self._last.items() if now - t < self.interval}
        self._last[address] = now
        skipped = self._skipped.pop(address, 0)
        log.warning("refused %s from %s: %s%s", method, peer, reason,
                    f" ({skipped} more refusals from {address} not logged)" if skipped else "")
        return True


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str, on_refused: Callable[[str], None] | None = None,
                 refusals: RefusalLog | None = None):
        self._expected = (BEARER + token).encode()
        self._on_refused = on_refused or (lambda method: None)
        self._refusals = refusals or RefusalLog()

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
        return _refusal(handler, message, lambda peer: self._refusals.refused(peer, details.method, message))


def _refusal(handler: grpc.RpcMethodHandler, message: str,
             note: Callable[[str], object]) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts; the request is never read."""

    async def refuse(request, context: grpc.aio.ServicerContext):
        note(context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request, context: grpc.aio.ServicerContext):
        note(context.peer())
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
