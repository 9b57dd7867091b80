"""Calling every shard at once: results in shard order, errors that name the shard.

A shard's failure fails the call that needed it, with the shard's index and
address in the message and its status code kept (a killed shard stays
UNAVAILABLE); the other shards are untouched and keep serving.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from .errors import KVStoreError

T = TypeVar("T")


def shard_error(error: KVStoreError, index: int, address: str, others: Sequence[str] = ()) -> KVStoreError:
    """The same error class and code, its message prefixed with the shard; `shard` and `address` set."""
    message = f"shard {index} ({address}): {error.message}"
    if others:
        message += "; also " + "; ".join(others)
    named = type(error)(error.code, message, error.reason)
    named.shard, named.address = index, address
    return named


class FanOut:
    """Runs one function per shard concurrently: the calling thread makes one call, a pool the others
    (a blocking gRPC call releases the GIL while it waits, NumPy while it copies)."""

    def __init__(self, addresses: Sequence[str]):
        self.addresses = list(addresses)
        self._pool = ThreadPoolExecutor(max(1, len(addresses)), thread_name_prefix="kvstore-shard")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def settle(self, call: Callable[[int], T], shards: Sequence[int] | None = None) -> dict[int, T | KVStoreError]:
        """call(i) for every shard in `shards` (default all), concurrently; each result or its KVStoreError."""
        indices = range(len(self.addresses)) if shards is None else shards
        if not indices:
            return {}
        *others, last = indices                    # the calling thread makes the last call itself
        futures: dict[int, Future] = {i: self._pool.submit(_outcome, call, i) for i in others}
        mine = _outcome(call, last)
        outcomes = {i: future.result() for i, future in futures.items()}
        outcomes[last] = mine
        return {i: outcomes[i] for i in indices}

    def each(self, call: Callable[[int], T], shards: Sequence[int] | None = None) -> dict[int, T]:
        """Like `settle`, but the first failing shard's error is raised, naming every shard that failed."""
        outcomes = self.settle(call, shards)
        self.raise_failures(outcomes)
        return outcomes  # type: ignore[return-value]

    def raise_failures(self, outcomes: dict[int, Any]) -> None:
        failed = [(i, e) for i, e in outcomes.items() if isinstance(e, KVStoreError)]
        if failed:
            (index, error), rest = failed[0], failed[1:]
            others = [f"shard {i} ({self.addresses[i]}): {e}" for i, e in rest]
            raise shard_error(error, index, self.addresses[index], others) from None


def _outcome(call: Callable[[int], T], index: int) -> T | KVStoreError:
    try:
        return call(index)
    except KVStoreError as error:
        return error
