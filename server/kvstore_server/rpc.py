"""Decorators every handler goes through: latency and in-flight calls are measured, errors mapped.

Handlers raise store errors (never call context.abort themselves); the wrapper
aborts with the mapped code. For response streams the wrapper sits around the
generator, so an error raised after some chunks were sent still reaches the
client with its code instead of UNKNOWN.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator

import grpc

from .errors import abort, status_of


class _Call:
    """One handled call: counted in flight, timed, and its error mapped to a status code."""

    def __init__(self, servicer, name: str, context: grpc.ServicerContext):
        self.metrics, self.name, self.context = servicer.metrics, name, context
        self.code = grpc.StatusCode.OK

    def __enter__(self) -> _Call:
        self.start = time.perf_counter()
        self.in_flight = self.metrics.rpc_in_flight.labels(self.name)
        self.in_flight.inc()
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        try:
            if isinstance(exc, GeneratorExit):
                self.code = grpc.StatusCode.CANCELLED
            elif isinstance(exc, Exception):      # every error must leave with a mapped code
                self.code, message, reason = _mapped(self.context, exc)
                abort(self.context, self.code, message, reason)
        finally:
            self.in_flight.dec()
            self.metrics.observe(self.name, self.code, time.perf_counter() - self.start)


def unary(method: Callable) -> Callable:
    """A handler that returns one response (unary or client-streaming)."""

    @functools.wraps(method)
    def handler(self, request, context: grpc.ServicerContext):
        with _Call(self, method.__name__, context):
            return method(self, request, context)

    return handler


def streaming(method: Callable) -> Callable:
    """A handler that yields responses (server- or bidi-streaming)."""

    @functools.wraps(method)
    def handler(self, request, context: grpc.ServicerContext) -> Iterator:
        with _Call(self, method.__name__, context):
            yield from method(self, request, context)

    return handler


class Cancelled(Exception):
    """Raised by a long handler that found its call no longer active."""


def check_active(context: grpc.ServicerContext) -> None:
    if not context.is_active():
        raise Cancelled()


def _mapped(context: grpc.ServicerContext, exc: Exception) -> tuple[grpc.StatusCode, str, str]:
    # Aborting a call whose client is gone is harmless and keeps grpc from logging the exception.
    if isinstance(exc, Cancelled) or not context.is_active():
        return grpc.StatusCode.CANCELLED, "call cancelled", "cancelled"
    return status_of(exc)
