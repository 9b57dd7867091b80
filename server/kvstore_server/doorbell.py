"""The same-host doorbell: SharedLookup calls over a Unix socket, read on the event loop.

A gRPC call costs the server about 0.7 ms of CPU on a 16-core host whatever it carries, most of
it inside grpcio: half of a same-host lookup of 4,096 rows, whose rows never touch gRPC. So a
server whose same-host path is on also listens on a Unix socket in Linux's abstract namespace
and answers SharedLookup calls there (framing: kvstore_proto/doorbell.py). Each call runs the
servicer's own SharedLookup, so its checks, codes and answer are the gRPC call's; it is admitted
by the same `CallGate`, counted in the same metrics and logged the same way.

Who may ring: a peer of the server's own user (SO_PEERCRED; the segments it names must be
that user's files anyway) that opens with the server's bearer token when one is set. A frame
that is not a call, or a token that does not match, is answered with its code and the
connection closed; a malformed request is INVALID_ARGUMENT and the connection stays usable.
"""
from __future__ import annotations

import asyncio
import hmac
import os
import socket
import struct
import time
import uuid

import grpc
from kvstore_proto.doorbell import HEADER, HELLO, MAX_PAYLOAD, SHARED_LOOKUP, error_payload, frame
from kvstore_proto.v1 import kvstore_pb2 as pb

from .errors import status_of
from .metrics import Metrics
from .rpc import CallGate, record_call, request_parser

_METHOD = pb.DESCRIPTOR.services_by_name["EmbeddingStore"].methods_by_name["SharedLookup"]
PATH = f"/{_METHOD.containing_service.full_name}/{_METHOD.name}"
_parse = request_parser(_METHOD, index_label=False)      # as the gRPC method parses it: INVALID_ARGUMENT naming it
_CREDENTIALS = struct.Struct("3i")       # struct ucred: pid, uid, gid


class _Context:
    """What SharedLookup asks of its call: the peer (local by construction here; its process id
    names it in the access log)."""

    def __init__(self, pid: int):
        self._peer = f"unix:doorbell:pid={pid}"

    def peer(self) -> str:
        return self._peer


class Doorbell:
    """The Unix socket and the connections of the clients ringing it."""

    def __init__(self, service, gate: CallGate, metrics: Metrics, token: str | None):
        self.service, self.gate, self.metrics = service, gate, metrics
        self._token = token.encode() if token else None
        self._server: asyncio.AbstractServer | None = None
        self.name = ""

    async def start(self) -> str:
        """Listen; returns the socket's name (abstract namespace, without the leading zero byte)."""
        name = f"kvstore-doorbell-{uuid.uuid4().hex}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + name)
            sock.listen(128)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            raise
        self.name = name
        return name

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            pid, uid, _ = _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              _CREDENTIALS.size))
            context = _Context(pid)
            refusal = self._refusal(uid, await _read(reader))
            if refusal is not None:
                writer.write(frame(refusal[0].value[0], error_payload("unauthenticated", refusal[1])))
                await writer.drain()
                return
            writer.write(frame(grpc.StatusCode.OK.value[0]))
            while True:
                kind, payload = await _read(reader)
                if kind != SHARED_LOOKUP:
                    writer.write(frame(grpc.StatusCode.INVALID_ARGUMENT.value[0], error_payload(
                        "invalid_argument", f"doorbell: frame kind {kind} is not a call ({SHARED_LOOKUP}: "
                                            "SharedLookup)")))
                    return
                writer.write(await self._call(payload, context))
                await writer.drain()
        except _FrameTooLarge as exc:
            writer.write(frame(grpc.StatusCode.INVALID_ARGUMENT.value[0], error_payload(
                "invalid_argument", f"doorbell: a frame of {exc.args[0]} bytes; at most {MAX_PAYLOAD}")))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass                         # the client went away
        finally:
            writer.close()

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

    async def _call(self, payload: bytes, context: _Context) -> bytes:
        """One SharedLookup, admitted, counted and logged as a gRPC call is; its answer frame."""
        start = time.perf_counter()
        refusal = self.gate.refusal()
        if refusal is not None:
            code, message, reason = refusal
            self._record(code, start, context)
            return frame(code.value[0], error_payload(reason, message))
        self.gate.enter()
        self.metrics.rpc_in_flight.labels("SharedLookup").inc()
        code = grpc.StatusCode.OK
        try:
            response = await self.service.SharedLookup(_parse(payload), context)
            return frame(code.value[0], response.SerializeToString())
        except Exception as exc:  # every error leaves as its status code, as from a gRPC handler
            code, message, reason = status_of(exc)
            return frame(code.value[0], error_payload(reason, message))
        finally:
            self.gate.leave()
            self.metrics.rpc_in_flight.labels("SharedLookup").dec()
            self._record(code, start, context)

    def _record(self, code: grpc.StatusCode, start: float, context: _Context) -> None:
        record_call(self.metrics, "SharedLookup", PATH, context.peer(), code, start)


class _FrameTooLarge(Exception):
    pass


async def _read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    size, kind = HEADER.unpack(await reader.readexactly(HEADER.size))
    if size > MAX_PAYLOAD:
        raise _FrameTooLarge(size)
    return kind, await reader.readexactly(size)
