"""A bare gRPC server: the transport's ceiling for kvstore's message patterns.

Generic handlers, raw bytes, no protobuf, pre-built replies. `Rows` answers each
chunk of n ids (8 n bytes) with n rows of `row-bytes` zero bytes (the lookup
pattern); `Sink` takes a stream of chunks and answers 8 bytes (the update and
gradient-push pattern). The same handlers run on a threaded or an asyncio (grpc.aio)
server, so kvstore's server of either kind has its ceiling. Run as its own process:

    python -m bench.echo [--asyncio]     # prints "listening on 127.0.0.1:PORT"
"""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from concurrent import futures

import grpc
import numpy as np

from .report import python_env

SERVICE = "bench.Echo"
ROWS_METHOD, SINK_METHOD = f"/{SERVICE}/Rows", f"/{SERVICE}/Sink"
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.so_reuseport", 0)]


def _reply_cache():
    replies: dict[int, bytes] = {}          # reply size -> zero bytes, built once

    def reply(size: int) -> bytes:
        if size not in replies:
            replies[size] = bytes(size)
        return replies[size]

    return reply


def _row_bytes(context) -> int:
    return int(dict(context.invocation_metadata()).get("row-bytes", "0"))


def _handler(rows, sink) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Rows": grpc.stream_stream_rpc_method_handler(rows),
        "Sink": grpc.stream_unary_rpc_method_handler(sink),
    })


def serve() -> None:
    """The echo service on a threaded gRPC server."""
    reply = _reply_cache()

    def rows(request_iterator, context):
        row_bytes = _row_bytes(context)
        for request in request_iterator:
            yield reply((len(request) // 8) * row_bytes)

    def sink(request_iterator, context):
        received = sum(len(request) for request in request_iterator)
        return received.to_bytes(8, "little")

    server = grpc.server(futures.ThreadPoolExecutor(8), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((_handler(rows, sink),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def serve_asyncio() -> None:
    """The same echo service on an asyncio gRPC server (grpc.aio)."""
    import asyncio

    reply = _reply_cache()

    async def rows(request_iterator, context):
        row_bytes = _row_bytes(context)
        async for request in request_iterator:
            yield reply((len(request) // 8) * row_bytes)

    async def sink(request_iterator, context):
        received = 0
        async for request in request_iterator:
            received += len(request)
        return received.to_bytes(8, "little")

    async def run() -> None:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        server.add_generic_rpc_handlers((_handler(rows, sink),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"listening on 127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


def start_process(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    """Start a server process and wait for its "listening on ADDRESS" line."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=python_env())
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.strip().rsplit(" ", 1)[-1]
    proc.wait()
    raise RuntimeError(f"{' '.join(cmd[:3])} did not start (exit code {proc.returncode})")


class EchoClient:
    """Streams the same bytes a kvstore client would, in chunks of `chunk_bytes`; a call of one
    chunk goes as a unary call, as the kvstore client sends it (`kvstore_client.writes.ClientStream`)."""

    def __init__(self, address: str, chunk_bytes: int):
        self.channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self._rows = self.channel.stream_stream(ROWS_METHOD)
        self._rows_one = self.channel.unary_unary(ROWS_METHOD)
        self._sink = self.channel.stream_unary(SINK_METHOD)
        self._sink_one = self.channel.unary_unary(SINK_METHOD)
        self.chunk_bytes = chunk_bytes

    def lookup(self, ids: np.ndarray, dim: int, dtype=np.float32) -> np.ndarray:
        """Ids up, rows down, chunked by the rows' bytes as the kvstore client chunks them."""
        row_bytes = dim * np.dtype(dtype).itemsize
        per_chunk = max(1, self.chunk_bytes // row_bytes)
        out = np.empty((len(ids), dim), dtype)
        metadata = (("row-bytes", str(row_bytes)),)
        if len(ids) <= per_chunk:
            out[:] = np.frombuffer(self._rows_one(ids.tobytes(), metadata=metadata), dtype).reshape(-1, dim)
            return out
        requests = (ids[i:i + per_chunk].tobytes() for i in range(0, len(ids), per_chunk))
        pos = 0
        for blob in self._rows(requests, metadata=metadata):
            part = np.frombuffer(blob, dtype).reshape(-1, dim)
            out[pos:pos + len(part)] = part
            pos += len(part)
        return out

    def push(self, arrays: Iterable[np.ndarray]) -> int:
        """Send ids and rows (or gradients) in chunks of about `chunk_bytes`; returns bytes received."""
        arrays = list(arrays)
        n = len(arrays[0])
        row_bytes = sum(a[:1].nbytes for a in arrays)
        per_chunk = max(1, self.chunk_bytes // row_bytes)
        if n <= per_chunk:
            return int.from_bytes(self._sink_one(b"".join(a.tobytes() for a in arrays)), "little")
        requests = (b"".join(a[i:i + per_chunk].tobytes() for a in arrays) for i in range(0, n, per_chunk))
        return int.from_bytes(self._sink(requests), "little")

    def close(self) -> None:
        self.channel.close()


def start_echo(asyncio_server: bool = False) -> tuple[subprocess.Popen, str]:
    return start_process([sys.executable, "-m", "bench.echo", *(["--asyncio"] if asyncio_server else [])])


if __name__ == "__main__":
    serve_asyncio() if "--asyncio" in sys.argv[1:] else serve()
