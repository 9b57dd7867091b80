"""A store-wide write gate: many writers at once, or one pause.

A snapshot closes the gate, waits for writes in flight to finish, does its
short critical work, and opens it again; reads never touch the gate and keep
going. A waiting pause stops new writers from entering, so a steady stream of
writes cannot starve it. Writers must not nest (`writing` inside `writing` on
one thread can deadlock against a waiting pause).
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


class WriteGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._writers = 0          # writes in flight
        self._pauses = 0           # pauses waiting or holding the gate

    @contextlib.contextmanager
    def writing(self, wait: bool = True) -> Iterator[bool]:
        """Hold the gate open for one write; yields True. `wait=False`: while a pause waits or
        holds the gate, yields False at once instead of waiting (the caller writes nothing)."""
        with self._cond:
            admitted = wait or not self._pauses
            if admitted:
                while self._pauses:
                    self._cond.wait()
                self._writers += 1
        if not admitted:
            yield False
            return
        try:
            yield True
        finally:
            with self._cond:
                self._writers -= 1
                if not self._writers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def paused(self) -> Iterator[float]:
        """Hold the gate closed; yields the seconds spent waiting for writes in flight."""
        start = time.perf_counter()
        with self._cond:
            self._pauses += 1
            try:
                while self._writers:
                    self._cond.wait()
            except BaseException:
                self._pauses -= 1
                self._cond.notify_all()
                raise
        try:
            yield time.perf_counter() - start
        finally:
            with self._cond:
                self._pauses -= 1
                self._cond.notify_all()
