"""The standard health service, with Watch streams bounded per peer address.

Health needs no token (probes call it), so it is the one service anyone who
reaches the port can use: each Watch stream is a coroutine (no thread), and one
address may hold at most `per_peer` of them; further ones get RESOURCE_EXHAUSTED
naming the limit. Check is never limited.
"""
from __future__ import annotations

from collections import Counter

import grpc
from grpc_health.v1 import health


def peer_address(peer: str) -> str:
    """The address of a gRPC peer string without its port: 'ipv4:10.0.0.7:5123' -> '10.0.0.7'."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer or "unknown"


class BoundedHealthServicer(health.aio.HealthServicer):
    def __init__(self, per_peer: int):
        super().__init__()
        self.per_peer = per_peer
        self.watching: Counter[str] = Counter()

    async def Watch(self, request, context: grpc.aio.ServicerContext) -> None:
        address = peer_address(context.peer())
        if self.watching[address] >= self.per_peer:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"health: {address} already holds {self.watching[address]} Watch streams, the "
                                "limit (max_health_watches_per_peer); use Check or close one")
        self.watching[address] += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watching[address] -= 1
            if not self.watching[address]:
                del self.watching[address]
