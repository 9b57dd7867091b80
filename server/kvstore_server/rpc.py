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


def unary(method: Callable) -> Callable:
    """A handler that returns one response (unary or client-streaming)."""
    name = method.__name__

    @functools.wraps(method)
    def handler(self, request, context: grpc.ServicerContext):
        start, code = time.perf_counter(), grpc.StatusCode.OK
        in_flight = self.metrics.rpc_in_flight.labels(name)
        in_flight.inc()
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error must leave with a mapped code
            code, message, reason = _mapped(context, exc)
            abort(context, code, message, reason)
        finally:
            in_flight.dec()
            self.metrics.observe(name, code, time.perf_counter() - start)

    return handler


def streaming(method: Callable) -> Callable:
    """A handler that yields responses (server- or bidi-streaming)."""
    name = method.__name__

    @functools.wraps(method)
    def handler(self, request, context: grpc.ServicerContext) -> Iterator:
        start, code = time.perf_counter(), grpc.StatusCode.OK
        in_flight = self.metrics.rpc_in_flight.labels(name)
        in_flight.inc()
        try:
            yield from method(self, request, context)
        except GeneratorExit:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - every error must leave with a mapped code
            code, message, reason = _mapped(context, exc)
            abort(context, code, message, reason)
        finally:
            in_flight.dec()
            self.metrics.observe(name, code, time.perf_counter() - start)

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
