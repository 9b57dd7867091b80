"""Streamed writes (Update, Delete, ApplyGradients, Import): one idempotency key per call, safe retries.

The server applies a streamed write only after its chunk marked `last` and a
clean half-close (so a cancelled call applies nothing),
and remembers recent keys: a retry with the same key after a lost reply gets the
first result and is not applied twice. So a write that failed UNAVAILABLE (a
connection reset, a server restarting) is retried here a few times with its key.
An error raised while the requests are built (a damaged export file, say) ends
the stream before its `last` chunk, so the server applies nothing (and has
dropped anything it staged when it answers), and is raised as itself, not as
gRPC's "Exception iterating requests!".
"""
from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from .errors import DataLossError, KVStoreError, UnavailableError
from .errors import rpc_errors as _rpc

RETRIES = 2
BACKOFF_SECONDS = 0.1


class ClientStream:
    """A client-streaming method, called as `call(requests, timeout=...)`, that sends a stream of
    one message as a unary call. The two are the same on gRPC's wire (one message, then the
    half-close), and the Python client starts a thread per streamed call to send its requests:
    a one-chunk write (most gradient pushes and updates) saves that thread's start and hand-offs."""

    def __init__(self, channel: grpc.Channel, method: str, request_serializer, response_deserializer):
        self.stream = channel.stream_unary(method, request_serializer=request_serializer,
                                           response_deserializer=response_deserializer)
        self.one = channel.unary_unary(method, request_serializer=request_serializer,
                                       response_deserializer=response_deserializer)

    def __call__(self, requests: Iterator, timeout: float | None = None) -> Any:
        requests = iter(requests)
        first = next(requests, _END)
        if first is _END:
            return self.stream(iter(()), timeout=timeout)
        second = next(requests, _END)
        if second is _END:
            return self.one(first, timeout=timeout)
        return self.stream(itertools.chain((first, second), requests), timeout=timeout)


_END = object()


def streamed_write(call: Callable, requests: Callable[[str], Iterator], timeout: float, retries: int = RETRIES,
                   marks: Callable[[Any], Any] = lambda request: request) -> Any:
    """`call(requests(key))` under a fresh key; retried with that key while the server is unavailable.
    `marks(request)` is the part of a request that holds `last` (ImportChain: its `rows`); for
    requests serialized beforehand (bytes), `marks(request)` returns the request marked `last`."""
    key = uuid.uuid4().hex
    for attempt in range(retries + 1):
        source = _Source(_mark_last(requests(key), marks))
        try:
            with _rpc():
                return call(iter(source), timeout=timeout)
        except KVStoreError as error:
            if source.error is not None:
                raise _source_error(source.error) from None
            if not isinstance(error, UnavailableError) or attempt == retries:
                raise
        time.sleep(BACKOFF_SECONDS * (attempt + 1))
    raise AssertionError("unreachable")


def _mark_last(requests: Iterator, marks: Callable[[Any], Any]) -> Iterator:
    """The requests, the final one marked `last`: the server applies the write only after it."""
    previous = None
    for request in requests:
        if previous is not None:
            yield previous
        previous = request
    if previous is not None:
        if isinstance(previous, bytes):
            yield marks(previous)
            return
        marks(previous).last = True
        yield previous


class _Source:
    """The requests of one try; keeps the exception that ended them, if any."""

    def __init__(self, requests: Iterator):
        self.requests = requests
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator:
        try:
            yield from self.requests
        except Exception as exc:               # noqa: BLE001 - raised again, as itself, by streamed_write
            self.error = exc                   # the stream ends without its `last` chunk: nothing is applied


def _source_error(exc: BaseException) -> BaseException:
    if isinstance(exc, KVStoreError):
        return exc
    if isinstance(exc, ValueError):            # e.g. kvstore_proto.export_format.ExportFormatError: a damaged file
        return DataLossError(message=str(exc))
    return exc
