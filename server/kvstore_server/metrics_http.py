"""The metrics endpoint over HTTP(S), optionally behind the server's bearer token.

Prometheus scrapes it with `authorization: {credentials_file: ...}` and `scheme: https` plus
`tls_config` when `metrics_auth` and `metrics_tls` are on. It binds `metrics_host`, loopback
by default, whatever `host` the gRPC port binds: the page lists every table and disk figure.
"""
from __future__ import annotations

import hmac
import socket
import ssl
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from kvstore.thread_names import os_named

BEARER = "Bearer "


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:     # scrapes are not worth a log line each
        pass


def guarded(app, token: str | None):
    """`app`, answering 401 to requests without `Authorization: Bearer <token>` (when a token is set)."""
    if not token:
        return app
    expected = (BEARER + token).encode()

    def check(environ, start_response):
        given = environ.get("HTTP_AUTHORIZATION", "").encode()
        if hmac.compare_digest(given, expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                            ("WWW-Authenticate", 'Bearer realm="kvstore metrics"')])
        return [b"metrics: missing or invalid bearer token\n"]

    return check


def serve_metrics(registry: CollectorRegistry, host: str, port: int, token: str | None = None,
                  tls: tuple[str, str] | None = None):
    """Start the exposition server in a daemon thread; returns (server, thread)."""

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    httpd = make_server(host.strip("[]"), port, guarded(make_wsgi_app(registry), token), server_class,
                        handler_class=_QuietHandler)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile=tls[0], keyfile=tls[1])
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=os_named(httpd.serve_forever), name="kvstore-metrics", daemon=True)
    thread.start()
    return httpd, thread
