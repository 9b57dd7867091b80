"""Client sessions: who holds prefetch locks, so a client that goes away loses them.

A session lives as long as the client's OpenSession stream. Each open stream
occupies one server worker thread, so `max_workers` bounds the number of
training clients that hold locks at once.
"""
from __future__ import annotations

import threading
import uuid

from kvstore import Store
from kvstore.errors import FailedPrecondition, InvalidArgument


class Sessions:
    def __init__(self, store: Store):
        self._store = store
        self._open: set[str] = set()
        self._lock = threading.Lock()

    def open(self) -> str:
        owner = uuid.uuid4().hex
        with self._lock:
            self._open.add(owner)
        return owner

    def close(self, owner: str) -> int:
        """End a session and release every lock it holds; returns rows released."""
        with self._lock:
            self._open.discard(owner)
        return self._store.release_owner(owner)

    def check(self, owner: str) -> None:
        if not owner:
            raise InvalidArgument("owner: required when lock is set (open a session first)")
        with self._lock:
            if owner not in self._open:
                raise FailedPrecondition(f"owner: no open session {owner!r}; locks need a live session")

    def settle(self, owner: str) -> None:
        """After taking locks: if the session ended meanwhile, release what was just taken."""
        with self._lock:
            gone = owner not in self._open
        if gone:
            self._store.release_owner(owner)

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)
