"""SharedLookup calls over the server's doorbell socket instead of gRPC (same machine only).

A gRPC call costs about a millisecond whatever it carries; a same-host lookup moves its rows
through shared memory, so that cost is most of a small lookup. The server names a Unix socket
(Linux's abstract namespace) when it attaches a segment; this sends SharedLookup calls there,
framed as kvstore_proto/doorbell.py says, one connection per calling thread, each call
waiting for its answer. The answers and errors are the gRPC call's: same messages, same codes.
"""
from __future__ import annotations

import os
import socket
import struct
import threading

import grpc
from kvstore_proto.doorbell import HEADER, HELLO, MAX_PAYLOAD, SHARED_LOOKUP, frame, parse_error
from kvstore_proto.v1 import kvstore_pb2 as pb

from .errors import BY_CODE, DeadlineExceededError, KVStoreError, UnavailableError

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_TIMEVAL = struct.Struct("@ll")           # struct timeval: SO_RCVTIMEO, SO_SNDTIMEO
_forks = 0                                # processes forked from this one: a child's connections are its own


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class NotRung(Exception):
    """The doorbell could not take the call (no connection, or the request could not be sent):
    nothing reached the server, so the same call may go over gRPC."""


class DoorbellClient:
    """`self(request, timeout)`: one SharedLookup, answered as the unary gRPC call would be."""

    def __init__(self, name: str, token: str | None):
        self.name = name
        self._hello = frame(HELLO, token.encode() if token else b"")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._forks = _forks

    def __call__(self, request: pb.SharedLookupRequest, timeout: float) -> pb.SharedLookupResponse:
        """The server's answer; KVStoreError with its code when it refused; NotRung when nothing
        reached the server; UnavailableError when the connection broke after the request went out,
        DeadlineExceededError when no answer came in `timeout` (in both the server may still be
        writing the rows: the caller must not reuse their region)."""
        return pb.SharedLookupResponse.FromString(self.call(request.SerializeToString(), timeout))

    def call(self, request: bytes, timeout: float) -> bytes:
        """As `self(request)` for a serialized SharedLookupRequest; the serialized answer."""
        sock = self._connection(timeout)
        try:
            sock.sendall(HEADER.pack(len(request), SHARED_LOOKUP) + request)
        except OSError as exc:
            self._drop(sock)
            raise NotRung(str(exc)) from None
        kind, payload = self._answer(sock, timeout)
        if kind != 0:
            raise _error(kind, payload)
        return payload

    def close(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            sock.close()

    def _connection(self, timeout: float) -> socket.socket:
        """This thread's connection, its deadline `timeout`. A blocking socket whose deadline the
        kernel keeps (SO_RCVTIMEO, SO_SNDTIMEO): a call is one send and one receive, with no poll
        before each as a Python socket timeout would add."""
        if self._forks != _forks:              # a forked child: its parent's connections are not its own
            self._local, self._sockets, self._forks = threading.local(), set(), _forks
        local = self._local
        sock = getattr(local, "socket", None)
        if sock is not None:
            if local.timeout != timeout:
                _set_deadline(sock, timeout)
                local.timeout = timeout
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _set_deadline(sock, timeout)
        try:
            sock.connect("\0" + self.name)
            sock.sendall(self._hello)
        except OSError as exc:          # the server is gone, or restarted with another doorbell
            sock.close()
            raise NotRung(str(exc)) from None
        try:
            kind, payload = self._answer(sock, timeout)
        except KVStoreError as exc:
            raise NotRung(str(exc)) from None
        if kind != 0:                   # refused (another user, another token): gRPC gives the verdict
            sock.close()
            raise NotRung(str(_error(kind, payload)))
        local.socket, local.timeout = sock, timeout
        with self._lock:
            self._sockets.add(sock)
        return sock

    def _answer(self, sock: socket.socket, timeout: float) -> tuple[int, bytes]:
        try:
            data = sock.recv(HEADER.size + _SHORT_ANSWER)       # the whole answer, mostly
            if len(data) < HEADER.size:
                data += _receive(sock, HEADER.size - len(data))
            size, kind = HEADER.unpack_from(data)
            if size > MAX_PAYLOAD:
                raise ConnectionError(f"an answer of {size} bytes")
            payload = data[HEADER.size:]
            return kind, payload + _receive(sock, size - len(payload)) if len(payload) < size else payload
        except (TimeoutError, BlockingIOError):       # SO_RCVTIMEO ran out: recv fails with EAGAIN
            self._drop(sock)
            raise DeadlineExceededError(message=f"doorbell: no answer within {timeout} s") from None
        except OSError as exc:         # the server closed the connection (stopped, or refused it)
            self._drop(sock)
            raise UnavailableError(message=f"doorbell: {exc}") from None

    def _drop(self, sock: socket.socket) -> None:
        """A connection whose state is unknown is not used again."""
        if getattr(self._local, "socket", None) is sock:
            self._local.socket = None
        with self._lock:
            self._sockets.discard(sock)
        sock.close()


_SHORT_ANSWER = 4096                      # bytes of payload read with the header (an answer is a few)


def _set_deadline(sock: socket.socket, timeout: float | None) -> None:
    """Receives and sends on `sock` fail after `timeout` seconds (None: never; at least 1 µs)."""
    micros = 0 if timeout is None else max(1, round(timeout * 1e6))
    value = _TIMEVAL.pack(micros // 1_000_000, micros % 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def _receive(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the server closed the doorbell connection")
        data += chunk
    return bytes(data)


def _error(kind: int, payload: bytes) -> KVStoreError:
    code = _CODES.get(kind, grpc.StatusCode.UNKNOWN)
    reason, message = parse_error(payload)
    return BY_CODE.get(code, KVStoreError)(code, message, reason)
