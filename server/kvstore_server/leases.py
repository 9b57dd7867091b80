"""Leases: who holds prefetch locks, for how long, independent of any connection.

As etcd's leases: a client is granted a lease id with a time to live, renews it
by using it (Prefetch, ApplyGradients, Release, Lookup naming it) or with a cheap
KeepAlive, and when it lapses the server releases every row the lease locked.
The clock is injected so expiry is tested without sleeping.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

from kvstore.errors import FailedPrecondition, InvalidArgument


class Leases:
    """Live lease ids and their deadlines; `expire` hands back the ones whose time ran out."""

    def __init__(self, ttl_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl_seconds
        self._clock = clock
        self._deadlines: dict[str, float] = {}
        self._lock = threading.Lock()
        self.expired_total = 0

    def grant(self) -> str:
        lease = uuid.uuid4().hex
        with self._lock:
            self._deadlines[lease] = self._clock() + self.ttl
        return lease

    def renew(self, lease: str, field: str = "owner") -> None:
        """Extend a live lease by the TTL; an unknown or lapsed one is FAILED_PRECONDITION naming `field`."""
        if not lease:
            raise InvalidArgument(f"{field}: a lease id is required (GrantLease gives one)")
        now = self._clock()
        with self._lock:
            deadline = self._deadlines.get(lease)
            if deadline is None or deadline <= now:
                raise FailedPrecondition(f"{field}: lease {lease[:64]!r} is unknown or expired; its locks were "
                                         "released; grant a new lease")
            self._deadlines[lease] = now + self.ttl

    def renew_if_live(self, lease: str) -> bool:
        """Renew when `lease` names a live lease; False (and nothing else) otherwise."""
        try:
            self.renew(lease)
        except (InvalidArgument, FailedPrecondition):
            return False
        return True

    def is_live(self, lease: str) -> bool:
        with self._lock:
            deadline = self._deadlines.get(lease)
        return deadline is not None and deadline > self._clock()

    def revoke(self, lease: str) -> bool:
        with self._lock:
            return self._deadlines.pop(lease, None) is not None

    def expire(self) -> list[str]:
        """Remove and return every lease past its deadline (their rows are the caller's to release)."""
        now = self._clock()
        with self._lock:
            lapsed = [lease for lease, deadline in self._deadlines.items() if deadline <= now]
            for lease in lapsed:
                del self._deadlines[lease]
            self.expired_total += len(lapsed)
        return lapsed

    def __len__(self) -> int:
        with self._lock:
            return len(self._deadlines)
