"""A small progress line on stderr: rows, rows/s and ETA (no dependency)."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """`update(n)` after each chunk; redraws at most every `interval` seconds; `done()` ends the line."""

    def __init__(self, label: str, total: int | None = None, out: TextIO | None = None,
                 interval: float = 0.5, enabled: bool = True):
        self.label, self.total, self.out = label, total or None, out or sys.stderr
        self.interval, self.enabled = interval, enabled
        self.rows = 0
        self.start = time.monotonic()
        self._drawn = 0.0

    def update(self, rows: int) -> None:
        self.rows += rows
        now = time.monotonic()
        if self.enabled and now - self._drawn >= self.interval:
            self._drawn = now
            self._draw(now, end="\r")

    def done(self) -> None:
        if self.enabled:
            self._draw(time.monotonic(), end="\n")

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.rows / elapsed
        text = f"{self.label}: {self.rows:,} rows"
        if self.total and self.total >= self.rows:
            eta = (self.total - self.rows) / rate if rate else 0.0
            text += f" of ~{self.total:,} ({100 * self.rows / self.total:.0f}%)"
            text += f", {rate:,.0f} rows/s, ETA {_clock(eta)}"
        else:
            text += f", {rate:,.0f} rows/s, {_clock(elapsed)} elapsed"
        return text

    def _draw(self, now: float, end: str) -> None:
        self.out.write(self.line(now).ljust(79) + end)
        self.out.flush()
