"""A store clock that a test can stop inside: the store reads its clock while it holds a table's lock,
so a call stopped there keeps that table busy for exactly as long as the test wants (no sleeps)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable


class HeldClock:
    """time.time, except that after `arm(on)` the first call made on a thread for which `on(thread)` is
    true stops there until `release()`; `holding` is set once it has stopped."""

    def __init__(self):
        self.holding = threading.Event()
        self._released = threading.Event()
        self._on: Callable[[threading.Thread], bool] | None = None
        self._lock = threading.Lock()

    def arm(self, on: Callable[[threading.Thread], bool]) -> None:
        self._on = on

    def release(self) -> None:
        self._released.set()

    def __call__(self) -> float:
        with self._lock:
            stop = self._on is not None and not self.holding.is_set() and self._on(threading.current_thread())
            if stop:
                self.holding.set()
        if stop:
            self._released.wait(60)
        return time.time()
