"""Lease RPCs and locked prefetch: a mixin of the servicer.

A prefetch lock belongs to a lease (`owner` = lease id), never to a connection:
GrantLease hands one out, using it or KeepAlive renews it, RevokeLease or its
expiry releases every row it locked (expiries are counted in
`kvstore_leases_expired_total`, at expiry, before the release). `expire_forever` is the server's background
task that finds lapsed leases.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from kvstore_proto.tensors import decode_ids
from kvstore_proto.v1 import kvstore_pb2 as pb

from kvstore import Store
from kvstore.errors import InvalidArgument

from .data_budget import DataBudget
from .leases import Leases
from .messages import concat
from .metrics import Metrics
from .rpc import StoreWork

log = logging.getLogger("kvstore_server")


class LeaseRPCs:
    """GrantLease, KeepAlive, RevokeLease, Prefetch, Release."""

    store: Store
    work: StoreWork
    metrics: Metrics
    data_budget: DataBudget

    def __init__(self, lease_seconds: float):
        self.leases = Leases(lease_seconds)
        self.metrics.watch_leases(self.leases)

    async def GrantLease(self, request, context):
        return pb.GrantLeaseResponse(lease=self.leases.grant(), ttl_seconds=self.leases.ttl)

    async def KeepAlive(self, request, context):
        self.leases.renew(request.lease, "lease")
        return pb.KeepAliveResponse(ttl_seconds=self.leases.ttl)

    async def RevokeLease(self, request, context):
        if not self.leases.revoke(request.lease):
            self.leases.renew(request.lease, "lease")           # names why: unknown or expired
        return pb.RevokeLeaseResponse(released=await self.work(self.store.release_owner, request.lease))

    async def Prefetch(self, requests: AsyncIterator, context):
        table, lock, owner, ids_parts, rows = None, False, "", [], 0
        async for request in requests:
            if table is None:
                table, lock, owner = request.table, request.lock, request.owner
                self.store.describe_table(table)
                if lock:
                    self.leases.renew(owner)
            elif request.table and request.table != table:
                raise InvalidArgument(f"table: chunk {len(ids_parts)} names {request.table!r} but the stream "
                                      f"began with {table!r}")
            ids_parts.append(decode_ids(request.ids, "ids"))
            rows = self._count_rows(rows, len(ids_parts[-1]))
        if table is None:
            return pb.PrefetchResponse(cached=0)
        cached = await self.on_table(table, self.data_budget.prefetch, table, concat(ids_parts), lock, owner)
        if lock and not self.leases.is_live(owner):     # lapsed meanwhile: what was just taken goes too
            await self.work(self.store.release_owner, owner)
        return pb.PrefetchResponse(cached=cached)

    async def Release(self, request, context):
        ids = decode_ids(request.ids, "ids")
        self._count_rows(0, len(ids))
        self.leases.renew_if_live(request.owner)
        return pb.ReleaseResponse(released=await self.on_table(request.table, self.store.release,
                                                                 request.table, ids, request.owner))

    async def expire_forever(self, interval: float) -> None:
        """Every `interval` seconds: release the rows of every lease whose time ran out."""
        while True:
            await asyncio.sleep(interval)
            await self.expire_now()

    async def expire_now(self) -> int:
        lapsed = self.leases.expire()
        for lease in lapsed:
            try:
                released = await self.work(self.store.release_owner, lease)
            except Exception:                          # noqa: BLE001 - a closing store: its locks go with it
                log.warning("releasing the rows of expired lease %s failed", lease, exc_info=True)
                continue
            log.info("lease %s expired: %d locked rows released", lease, released)
        return len(lapsed)
