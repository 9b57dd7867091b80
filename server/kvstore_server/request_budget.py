"""A memory budget for the request bytes the server buffers, server-wide and per connection.

Streamed writes (Update, Delete, ApplyGradients) hold every chunk until the client
half-closes, because they are all-or-nothing; a Train step holds its messages until
the one that ends the step. Each chunk is charged as it arrives,
before the handler decodes and keeps it: past `max_buffered_bytes` (all calls together)
or `max_buffered_bytes_per_peer` (the calls of one connection) the call ends
RESOURCE_EXHAUSTED naming the option, and nothing is applied. What a call holds is
released when it ends, however it ends (success, error, cancel). The bytes counted are
the chunks' wire size; the store's own work on a committed batch comes on top of it
(docs/security.md, "Memory").

Only the event loop charges and releases, so no lock is needed.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import grpc

from kvstore.errors import ResourceExhausted

from .budgets import machine_memory_bytes

GLOBAL_SHARE = 8          # by default all buffered writes together may hold 1/8 of the machine's memory ...
PEER_SHARE = 4            # ... and one connection a quarter of that
FALLBACK_BYTES = 1 << 30  # the global default when the machine's memory is unknown


def default_buffered_budget() -> int:
    memory = machine_memory_bytes()
    return memory // GLOBAL_SHARE if memory else FALLBACK_BYTES


class RequestMemory:
    """Buffered request bytes of every call in progress, in total and by connection (gRPC peer)."""

    def __init__(self, total: int, per_peer: int):
        self.total = total
        self.per_peer = per_peer
        self.used = 0
        self.by_peer: Counter[str] = Counter()

    @classmethod
    def from_options(cls, total: int, per_peer: int) -> RequestMemory:
        """The budgets of the config keys, 0 meaning the default (see GLOBAL_SHARE, PEER_SHARE)."""
        total = total or default_buffered_budget()
        return cls(total, per_peer or max(1, total // PEER_SHARE))

    def hold(self, context: grpc.aio.ServicerContext) -> BufferedRequest:
        """What one call buffers: `with memory.hold(context) as held:` around the whole handler."""
        return BufferedRequest(self, context.peer())

    def take(self, peer: str, size: int) -> None:
        """Charge `size` bytes to `peer`, or ResourceExhausted naming the budget it would pass."""
        if self.by_peer[peer] + size > self.per_peer:
            raise ResourceExhausted(
                f"max_buffered_bytes_per_peer: this connection's streamed writes would buffer "
                f"{self.by_peer[peer] + size:,} bytes, over the budget of {self.per_peer:,}; split the write into "
                "smaller calls (or raise max_buffered_bytes_per_peer)")
        if self.used + size > self.total:
            raise ResourceExhausted(
                f"max_buffered_bytes: streamed writes in progress would buffer {self.used + size:,} bytes, over "
                f"the server's budget of {self.total:,}; retry later or split the write into smaller calls")
        self.used += size
        self.by_peer[peer] += size

    def give_back(self, peer: str, size: int) -> None:
        self.used -= size
        self.by_peer[peer] -= size
        if self.by_peer[peer] <= 0:
            del self.by_peer[peer]


class BufferedRequest:
    """The bytes one call holds; all given back when the `with` block ends."""

    def __init__(self, memory: RequestMemory, peer: str):
        self.memory = memory
        self.peer = peer
        self.bytes = 0

    def __enter__(self) -> BufferedRequest:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Give back everything held so far (a stream of many calls' worth: after each one)."""
        if self.bytes:
            self.memory.give_back(self.peer, self.bytes)
            self.bytes = 0

    def charge(self, size: int) -> None:
        """Hold `size` more bytes for this call (ResourceExhausted past the budgets, nothing held then)."""
        self.memory.take(self.peer, size)
        self.bytes += size

    async def chunks(self, requests: AsyncIterator, wire) -> AsyncIterator:
        """The parsed requests of a stream, each charged at its wire size before it is handed on.
        `wire`: the stream's `rpc.ParsedRequests` (`requests` may wrap it), whose byte count gives
        each chunk's size."""
        charged = 0
        async for request in requests:
            self.charge(wire.wire_bytes - charged)
            charged = wire.wire_bytes
            yield request
