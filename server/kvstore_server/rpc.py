"""How every call of the service runs on the asyncio server.

grpcio hands each handler raw request bytes (identity deserializers): the
service parses them, so a malformed message is INVALID_ARGUMENT naming the
method and the connection stays usable. Each call passes the `CallGate`
(admission: beyond `max_concurrent_rpcs` calls RESOURCE_EXHAUSTED with a
`retry-after-ms` hint; once shutdown began, UNAVAILABLE), is counted in flight,
timed, logged with its request id, and any error leaves mapped to its status
code, also from inside a response stream. Store work runs in `StoreWork`, a
bounded thread pool: the event loop itself never blocks.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from kvstore.errors import InvalidArgument
from kvstore.thread_names import name_this_thread

from .errors import REASON_KEY, status_of
from .logs import begin_call, end_call
from .metrics import Metrics

RETRY_AFTER_KEY = "retry-after-ms"
T = TypeVar("T")


def default_workers() -> int:
    """Store threads sized to the machine: RocksDB reads release the GIL, so more threads than cores help."""
    return min(32, (os.cpu_count() or 1) + 4)


class StoreWork:
    """The bounded executor every blocking store call runs in (`await work(fn, *args)`)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kvstore-store",
                                        initializer=name_this_thread)

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        job = functools.partial(contextvars.copy_context().run, fn, *args)     # logs keep the request id
        return await asyncio.get_running_loop().run_in_executor(self._pool, job)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class CallGate:
    """Admission control: how many calls run now, whether new ones are taken, and when all are done.
    Calls are admitted on the event loop and in the doorbell's connection threads alike (a lock)."""

    def __init__(self, limit: int, retry_after_ms: int):
        self.limit = limit
        self.retry_after_ms = retry_after_ms
        self.active = 0
        self.draining = False
        self._idle = threading.Condition()

    def admit(self) -> tuple[grpc.StatusCode, str, str] | None:
        """Take a new call (counted until `leave`), or say why not: (code, message, reason)."""
        with self._idle:
            refusal = self._refusal()
            if refusal is None:
                self.active += 1
            return refusal

    def _refusal(self) -> tuple[grpc.StatusCode, str, str] | None:
        if self.draining:
            return grpc.StatusCode.UNAVAILABLE, "server: shutting down; retry on another replica", "shutting_down"
        if self.active >= self.limit:
            return (grpc.StatusCode.RESOURCE_EXHAUSTED, f"server: {self.active} calls in progress, the limit "
                    f"(max_concurrent_rpcs); retry after {self.retry_after_ms} ms", "overloaded")
        return None

    def leave(self) -> None:
        with self._idle:
            self.active -= 1
            if self.active == 0 and self.draining:      # only `drain` waits
                self._idle.notify_all()

    def refuse_new(self) -> None:
        """From now on new calls are refused UNAVAILABLE (shutdown began); running ones go on."""
        with self._idle:
            self.draining = True

    async def drain(self, seconds: float) -> bool:
        """Refuse new calls; wait up to `seconds` for the running ones. True when all finished."""
        self.refuse_new()
        return await asyncio.to_thread(self._wait_idle, seconds)

    def _wait_idle(self, seconds: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self.active == 0, seconds)


class _Call:
    """One call of the service: admitted, counted in flight, timed, logged; errors mapped and aborted."""

    def __init__(self, gate: CallGate, metrics: Metrics, method, context: grpc.aio.ServicerContext):
        self.gate, self.metrics, self.context = gate, metrics, context
        self.name, self.path = method.name, f"/{method.containing_service.full_name}/{method.name}"
        self.code = grpc.StatusCode.OK
        self.admitted = False

    async def __aenter__(self) -> _Call:
        self.start = time.perf_counter()
        self.peer = self.context.peer()            # now: a cancelled call's context must not be asked later
        self._metadata = begin_call(self.context)     # sent while the call works: one round trip less
        refusal = self.gate.admit()
        if refusal is not None:
            code, message, reason = refusal
            metadata = ((REASON_KEY, reason),) + (((RETRY_AFTER_KEY, str(self.gate.retry_after_ms)),)
                                                  if code is grpc.StatusCode.RESOURCE_EXHAUSTED else ())
            await self._abort(code, message, metadata)
        self.admitted = True
        self.metrics.rpc_in_flight.labels(self.name).inc()
        return self

    async def __aexit__(self, kind, exc, traceback) -> None:
        try:
            if exc is None:
                await self.ready()                   # an empty response stream: the status follows it
            elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                self.code = grpc.StatusCode.CANCELLED
            elif isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
                code, message, reason = status_of(exc)
                self.code = code
                self._leave()                        # counted before the client can see the status
                await self._abort(code, message, ((REASON_KEY, reason),))
        finally:
            self._leave()

    def _leave(self) -> None:
        if self.admitted:
            self.admitted = False
            self.gate.leave()
            self.metrics.rpc_in_flight.labels(self.name).dec()
            self._record()

    async def ready(self) -> None:
        """The initial metadata went out: responses (and the status) may follow."""
        if self._metadata is not None:
            await self._metadata
            self._metadata = None

    async def _abort(self, code: grpc.StatusCode, message: str, metadata: tuple) -> None:
        await self.ready()
        if self.code != code:                        # refused at admission: never admitted, record it here
            self.code = code
            self._record()
        self.context.set_trailing_metadata(metadata)
        await self.context.abort(code, message)

    def _record(self) -> None:
        record_call(self.metrics, self.name, self.path, self.peer, self.code, self.start)


def record_call(metrics: Metrics, name: str, path: str, peer: str, code: grpc.StatusCode, start: float) -> None:
    """A finished call (started at perf_counter() `start`) in the duration metric and the access log:
    the gRPC methods' calls and the doorbell's alike."""
    seconds = time.perf_counter() - start
    metrics.observe(name, code, seconds)
    end_call(peer, path, code, seconds)


def request_parser(method, index_label: bool,
                   decode: Callable[[bytes], Any] | None = None) -> Callable[[bytes, int], Any]:
    """How `method`'s request bytes are read: a message that does not parse is INVALID_ARGUMENT
    naming the method (and the chunk, with `index_label`)."""
    kind = GetMessageClass(method.input_type)
    decode = decode or kind.FromString

    def parse(raw: bytes, index: int = 0):
        try:
            return decode(raw)
        except (DecodeError, RuntimeError, ValueError):
            where = f" (chunk {index})" if index_label else ""
            raise InvalidArgument(f"{method.name}: the request{where} is not a valid {kind.__name__} "
                                  "message") from None

    return parse


class ParsedRequests:
    """The parsed chunks of a request stream. `wire_bytes` counts the bytes of the chunks parsed so
    far: what holding them costs, known without `ByteSize()`, which encodes a message again to size it."""

    def __init__(self, requests: AsyncIterator[bytes], parse: Callable[[bytes, int], Any]):
        self._requests = aiter(requests)
        self._parse = parse
        self._index = 0
        self.wire_bytes = 0

    def __aiter__(self) -> ParsedRequests:
        return self

    async def __anext__(self) -> Any:
        raw = await anext(self._requests)
        message = self._parse(raw, self._index)
        self._index += 1
        self.wire_bytes += len(raw)
        return message


async def whole_stream(requests: AsyncIterator, context: grpc.aio.ServicerContext,
                       marks_field: str = "") -> AsyncIterator:
    """The chunks of a streamed write; it ends normally only when the stream is complete. grpcio ends
    a cancelled request stream the way it ends a finished one, so completeness is in the protocol:
    the final chunk carries `last` (the client library marks it). A stream that ends without it
    was cancelled or cut, and is refused with nothing applied. `marks_field` names the message
    inside each request that holds `last` (ImportChain: `rows`), if not the request itself."""
    last, index = False, 0
    name = f"{marks_field}.last" if marks_field else "last"
    async for request in requests:
        if last:
            raise InvalidArgument(f"{name}: chunk {index} follows the chunk marked last")
        last = (getattr(request, marks_field) if marks_field else request).last
        yield request
        index += 1
    if index and not last:
        raise InvalidArgument(f"{name}: the stream ended before a chunk marked last (cancelled, or a client that "
                              "does not mark its final chunk); nothing was applied")


def bind(method, handler: Callable, gate: CallGate, metrics: Metrics, decode: Callable[[bytes], Any] | None = None):
    """The grpc behavior of one service method: bytes in, the handler's result out, through a `_Call`.
    `decode`: how a request is read, where not into its message (server.IN_PLACE)."""
    streaming_request = method.client_streaming
    parse = request_parser(method, streaming_request, decode)

    def argument(request):
        return ParsedRequests(request, parse) if streaming_request else parse(request)

    if method.server_streaming:
        async def stream(request, context: grpc.aio.ServicerContext):
            async with _Call(gate, metrics, method, context) as call:
                async for response in handler(argument(request), context):
                    await call.ready()
                    yield response

        return stream

    async def single(request, context: grpc.aio.ServicerContext):
        async with _Call(gate, metrics, method, context) as call:
            response = await handler(argument(request), context)
            await call.ready()
            return response

    return single
