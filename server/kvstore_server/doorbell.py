"""The same-host doorbell: SharedLookup calls over a Unix socket, each connection served by a thread.

A gRPC call costs the server about 0.7 ms of CPU on a 16-core host whatever it carries, most of
it inside grpcio: half of a same-host lookup of 4,096 rows, whose rows never touch gRPC. So a
server whose same-host path is on also listens on a Unix socket in Linux's abstract namespace
and answers SharedLookup calls there (framing: kvstore_proto/doorbell.py). The event loop's own
cost per call (waking, stream buffers, futures) was a quarter of what was left, so each
connection has a thread of its own that reads its frames with blocking calls and answers a
lookup of cached rows right there (`shared_lookup_now`: the rows gathered straight into the
client's segment). Any other lookup (rows to read from RocksDB, a lease to renew, a GPU buffer,
a busy table) is handed to the event loop's SharedLookup and the thread waits for its answer.
Either way the checks, codes and answer are the gRPC call's; it is admitted by the same
`CallGate`, counted in the same metrics and logged the same way.

Who may ring: a peer of the server's own user (SO_PEERCRED; the segments it names must be
that user's files anyway) that opens with the server's bearer token when one is set, while
fewer than `max_concurrent_rpcs` connections are open (beyond that RESOURCE_EXHAUSTED: the
client takes gRPC). A frame that is not a call, or a token that does not match, is answered
with its code and the connection closed; a malformed request is INVALID_ARGUMENT and the
connection stays usable.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import os
import socket
import struct
import threading
import time
import uuid

import grpc
from kvstore_proto.doorbell import HEADER, HELLO, MAX_PAYLOAD, SHARED_LOOKUP, error_payload, frame
from kvstore_proto.v1 import kvstore_pb2 as pb

from kvstore.thread_names import os_named

from .errors import status_of
from .metrics import Metrics
from .rpc import CallGate, record_call, request_parser

_METHOD = pb.DESCRIPTOR.services_by_name["EmbeddingStore"].methods_by_name["SharedLookup"]
PATH = f"/{_METHOD.containing_service.full_name}/{_METHOD.name}"
_parse = request_parser(_METHOD, index_label=False)      # as the gRPC method parses it: INVALID_ARGUMENT naming it
_CREDENTIALS = struct.Struct("3i")       # struct ucred: pid, uid, gid
_OK = grpc.StatusCode.OK.value[0]
_STOPPED = (grpc.StatusCode.UNAVAILABLE, "server: shutting down; retry on another replica", "shutting_down")


class _Context:
    """One connection's: what SharedLookup asks of its call, the peer (local by construction here;
    its process id names it in the access log); and its last call's request and answer, which a
    client's loop sends and gets again (same segment, same shape): not parsed or encoded again,
    and what the service checked the request into (`plan`: SameHostRPCs.shared_lookup_now's)."""

    def __init__(self, pid: int):
        self._peer = f"unix:doorbell:pid={pid}"
        self._payload, self._request = b"", None
        self._rows, self._answer = -1, b""
        self.plan = None

    def peer(self) -> str:
        return self._peer

    def request(self, payload: bytes) -> pb.SharedLookupRequest:
        if self._request is None or payload != self._payload:
            self._request, self._payload = _parse(payload), payload      # a payload that does not parse: not kept
        return self._request

    def answer(self, rows: int) -> bytes:
        if rows != self._rows:
            self._answer, self._rows = frame(_OK, pb.SharedLookupResponse(rows=rows).SerializeToString()), rows
        return self._answer


class Doorbell:
    """The Unix socket, and a thread for each client connection ringing it."""

    def __init__(self, service, gate: CallGate, metrics: Metrics, token: str | None):
        self.service, self.gate, self.metrics = service, gate, metrics
        self._token = token.encode() if token else None
        self._in_flight = metrics.rpc_in_flight.labels("SharedLookup")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._closed = False
        self.name = ""

    async def start(self) -> str:
        """Listen; returns the socket's name (abstract namespace, without the leading zero byte)."""
        name = f"kvstore-doorbell-{uuid.uuid4().hex}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + name)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self._loop = asyncio.get_running_loop()
        self._listener = sock
        threading.Thread(target=os_named(self._accept), args=(sock,), name="kvstore-doorbell", daemon=True).start()
        self.name = name
        return name

    async def close(self) -> None:
        """No new connections or calls: each connection ends once the call it is serving (if any)
        is answered. The server drains its calls after this."""
        with self._lock:
            self._closed = True
            listener, self._listener = self._listener, None
            connections = list(self._connections)
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)   # wakes the accepting thread (Linux)
            except OSError:
                pass                                  # elsewhere it stays asleep: a daemon thread, no harm
            listener.close()
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RD)         # its thread reads the end after its answer
            except OSError:
                pass

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return                                # closed
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                thread = threading.Thread(target=os_named(self._serve), args=(sock,),
                                          name="kvstore-doorbell-connection", daemon=True)
                full = len(self._connections) >= self.gate.limit
                if not full:
                    self._connections.add(sock)
            if full:
                self._refuse_full(sock)
            else:
                thread.start()

    def _refuse_full(self, sock: socket.socket) -> None:
        """Answered before its hello is read (a short frame into an empty socket buffer: no wait)."""
        with sock:
            try:
                sock.setblocking(False)
                sock.send(frame(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], error_payload(
                    "overloaded", f"doorbell: {self.gate.limit} connections open, the limit (max_concurrent_rpcs); "
                                  "use gRPC")))
            except OSError:
                pass

    def _serve(self, sock: socket.socket) -> None:
        try:
            pid, uid, _ = _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              _CREDENTIALS.size))
            context = _Context(pid)
            frames = _Frames(sock)
            refusal = self._refusal(uid, frames.next())
            if refusal is not None:
                sock.sendall(frame(refusal[0].value[0], error_payload("unauthenticated", refusal[1])))
                return
            sock.sendall(frame(_OK))
            while True:
                kind, payload = frames.next()
                if kind != SHARED_LOOKUP:
                    sock.sendall(frame(grpc.StatusCode.INVALID_ARGUMENT.value[0], error_payload(
                        "invalid_argument", f"doorbell: frame kind {kind} is not a call ({SHARED_LOOKUP}: "
                                            "SharedLookup)")))
                    return
                sock.sendall(self._call(payload, context))
        except _FrameTooLarge as exc:
            try:
                sock.sendall(frame(grpc.StatusCode.INVALID_ARGUMENT.value[0], error_payload(
                    "invalid_argument", f"doorbell: a frame of {exc.args[0]} bytes; at most {MAX_PAYLOAD}")))
            except OSError:
                pass
        except OSError:
            pass                         # the client went away, or the server is closing
        finally:
            with self._lock:
                self._connections.discard(sock)
            sock.close()

    def _refusal(self, uid: int, hello: tuple[int, bytes]) -> tuple[grpc.StatusCode, str] | None:
        """Why a connection of user `uid` that opened with `hello` may not ring, or None."""
        if uid != os.getuid():
            return grpc.StatusCode.UNAUTHENTICATED, "doorbell: only processes of the server's own user may ring"
        kind, token = hello
        if kind != HELLO:
            return grpc.StatusCode.UNAUTHENTICATED, "doorbell: a connection opens with a hello frame"
        if self._token is not None and not hmac.compare_digest(token, self._token):
            self.metrics.auth_failures.labels("SharedLookup").inc()
            return grpc.StatusCode.UNAUTHENTICATED, f"doorbell: {'missing' if not token else 'invalid'} bearer token"
        return None

    def _call(self, payload: bytes, context: _Context) -> bytes:
        """One SharedLookup, admitted, counted and logged as a gRPC call is; its answer frame."""
        start = time.perf_counter()
        refusal = self.gate.admit()
        if refusal is not None:
            code, message, reason = refusal
            self._record(code, start, context)
            return frame(code.value[0], error_payload(reason, message))
        self._in_flight.inc()
        code = grpc.StatusCode.OK
        try:
            request = context.request(payload)
            rows = self.service.shared_lookup_now(request, context)
            return context.answer(self._on_loop(request, context) if rows is None else rows)
        except _Stopped:
            code, message, reason = _STOPPED
            return frame(code.value[0], error_payload(reason, message))
        except Exception as exc:  # every error leaves as its status code, as from a gRPC handler
            code, message, reason = status_of(exc)
            return frame(code.value[0], error_payload(reason, message))
        finally:
            self.gate.leave()
            self._in_flight.dec()
            self._record(code, start, context)

    def _on_loop(self, request: pb.SharedLookupRequest, context: _Context) -> int:
        """The event loop's SharedLookup of `request` (store threads, leases, GPU buffers), awaited
        here; the rows it wrote."""
        try:
            future = asyncio.run_coroutine_threadsafe(self.service.SharedLookup(request, context), self._loop)
        except RuntimeError:                     # the loop is closed: the server has stopped
            raise _Stopped() from None
        try:
            return future.result().rows
        except concurrent.futures.CancelledError:
            raise _Stopped() from None

    def _record(self, code: grpc.StatusCode, start: float, context: _Context) -> None:
        record_call(self.metrics, "SharedLookup", PATH, context.peer(), code, start)


class _FrameTooLarge(Exception):
    pass


class _Stopped(Exception):
    """The event loop ended the call, or had ended, with the server's stop."""


class _Frames:
    """A connection's frames, read with as few receives as its bytes allow: one a call, mostly."""

    READ_BYTES = 4096                 # far more than a call's frame

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buffer = b""            # bytes received past the last frame returned

    def next(self) -> tuple[int, bytes]:
        data = self._buffer
        while len(data) < HEADER.size:
            data += self._more(HEADER.size - len(data))
        size, kind = HEADER.unpack_from(data)
        if size > MAX_PAYLOAD:
            raise _FrameTooLarge(size)
        end = HEADER.size + size
        while len(data) < end:
            data += self._more(end - len(data))
        self._buffer = data[end:]
        return kind, data[HEADER.size:end]

    def _more(self, needed: int) -> bytes:
        chunk = self._sock.recv(max(needed, self.READ_BYTES))
        if not chunk:
            raise ConnectionError("the client closed the connection")
        return chunk
