"""Recent streamed writes by idempotency key, so a retry after a lost reply is not applied twice.

The client names each streamed write (Update, Delete, ApplyGradients, Import)
with a fresh key and repeats it on a retry. The first call with a key commits
and its response is kept for `seconds` (at most `capacity` keys, oldest dropped
first); a retry gets that response without touching the store. A retry arriving
while the first is still committing waits for it. A failed call is not kept:
its retry runs anew (a failed call changed nothing).
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from kvstore.errors import InvalidArgument

MAX_KEY_LENGTH = 128


class RecentWrites:
    def __init__(self, capacity: int, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.seconds = seconds
        self._clock = clock
        self._done: OrderedDict[tuple[str, str], tuple[float, Any]] = OrderedDict()
        self._running: dict[tuple[str, str], asyncio.Future] = {}
        self.replayed = 0

    async def once(self, method: str, key: str, commit: Callable[[], Awaitable[Any]]) -> Any:
        """`commit()`'s response, or the response of the first call that carried `key`."""
        if not key:
            return await commit()
        if len(key) > MAX_KEY_LENGTH:
            raise InvalidArgument(f"idempotency_key: at most {MAX_KEY_LENGTH} characters, got {len(key)}")
        slot = (method, key)
        while True:
            self._drop_old()
            if slot in self._done:
                self.replayed += 1
                return self._done[slot][1]
            running = self._running.get(slot)
            if running is None:
                break
            await asyncio.wait([running])        # the first try ends; succeeded -> in _done, else run anew
        finished = asyncio.get_running_loop().create_future()
        self._running[slot] = finished
        try:
            response = await commit()
            self._done[slot] = (self._clock(), response)
            return response
        finally:
            del self._running[slot]
            finished.set_result(None)

    def known(self, method: str, key: str) -> bool:
        """Whether a call with `key` committed recently or is committing now (a retry will be answered
        with its response): checks that only hold for a first try must not refuse such a retry. Only
        reads (safe from a store thread); a key past its time still counts until `once` drops it."""
        return bool(key) and ((method, key) in self._done or (method, key) in self._running)

    def _drop_old(self) -> None:
        oldest = self._clock() - self.seconds
        while self._done and (len(self._done) > self.capacity or next(iter(self._done.values()))[0] < oldest):
            self._done.popitem(last=False)
