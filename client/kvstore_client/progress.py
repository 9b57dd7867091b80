"""Progress of a long command on stderr: a bar on a terminal, plain lines in logs.

On a terminal (and with `rich` installed: the `cli` extra) a `rich` bar shows rows done of
the estimate, the rate, the MiB/s and the ETA, redrawn in place. Anywhere else (a pipe, a
file, a CI log) one plain line is written every `interval` seconds, never a `\\r`, and the
closing summary is written exactly once. Both report the same figures, from the same clock.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO, TypeVar

T = TypeVar("T")
MIB = float(1 << 20)


def clock_text(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _rich_available() -> bool:
    try:
        import rich.progress  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """Rows moved so far. `update(rows, nbytes)` after each chunk, `done()` once at the end;
    `wait(fn)` runs one long call and shows the time it has taken so far."""

    def __init__(self, label: str, total: int | None = None, out: TextIO | None = None, *,
                 interval: float = 10.0, enabled: bool = True, bar: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.out = label, total or None, out or sys.stderr
        self.interval, self.enabled, self.clock = interval, enabled, clock
        self.rows = self.bytes = 0
        self.start = self._drawn = clock()
        if bar is None:
            bar = enabled and _isatty(self.out) and _rich_available()
        self._bar = _RichBar(self) if bar and enabled else None
        self._finished = False

    # --- figures ---------------------------------------------------------------

    def line(self, now: float | None = None) -> str:
        """One line with the figures as of `now`: rows of the estimate, rate, MiB/s, ETA or elapsed."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.rows / elapsed
        text = f"{self.label}: {self.rows:,} rows"
        if self.total and self.total >= self.rows and not self._finished:
            text += f" of ~{self.total:,} ({100 * self.rows / self.total:.0f}%)"
        text += f", {rate:,.0f} rows/s"
        if self.bytes:
            text += f", {self.bytes / MIB / elapsed:,.1f} MiB/s"
        if self.total and self.total >= self.rows and not self._finished:
            eta = (self.total - self.rows) / rate if rate else 0.0
            text += f", ETA {clock_text(eta)}"
        else:
            text += f", {clock_text(elapsed)} {'in all' if self._finished else 'elapsed'}"
        return text

    # --- reporting ---------------------------------------------------------------

    def update(self, rows: int, nbytes: int = 0) -> None:
        self.rows += rows
        self.bytes += nbytes
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.advance(rows)
            return
        now = self.clock()
        if now - self._drawn >= self.interval:
            self._drawn = now
            self._write(self.line(now))

    def done(self) -> None:
        """The closing line, drawn once however often this is called."""
        if self._finished:
            return
        self._finished = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.stop()
        else:
            self._write(self.line())

    def wait(self, call: Callable[[], T]) -> T:
        """Run `call` (one long RPC), showing the elapsed time meanwhile; the summary after."""
        if not self.enabled:
            return call()
        finished = threading.Event()
        ticker = None if self._bar is not None else threading.Thread(target=self._tick, args=(finished,),
                                                                     daemon=True)
        if ticker is not None:
            ticker.start()
        try:
            return call()
        finally:
            finished.set()
            if ticker is not None:
                ticker.join()
            self._finished = True          # the command prints its own result
            if self._bar is not None:
                self._bar.stop(summary=False)

    def _tick(self, finished: threading.Event) -> None:
        while not finished.wait(self.interval):
            self._write(f"{self.label}: {clock_text(self.clock() - self.start)} elapsed")

    def _write(self, text: str) -> None:
        try:
            self.out.write(text + "\n")
            self.out.flush()
        except (BrokenPipeError, ValueError):
            self.enabled = False        # stderr went away: the work itself goes on

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.done()
        elif self._bar is not None:
            self._bar.stop()


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


class _RichBar:
    """The terminal form of a Progress: rich's live bar with rows/s and the ETA it estimates."""

    def __init__(self, progress: Progress):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.owner = progress
        if progress.total:          # rows of a known estimate: bar, share, count, time left
            columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), MofNCompleteColumn(),
                       TextColumn("rows"), TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[mib]}"),
                       TimeRemainingColumn()]
        else:                       # no estimate (or one long call): spinner, what moved so far, time spent
            columns = [TextColumn("{task.description}"), SpinnerColumn(), TextColumn("{task.fields[count]}"),
                       TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[mib]}"), TimeElapsedColumn()]
        self.live = Progress(*columns, console=Console(file=progress.out), refresh_per_second=5,
                             speed_estimate_period=10.0, transient=True)
        self.task = self.live.add_task(progress.label, total=progress.total, count="", rate="", mib="")
        self.live.start()

    def advance(self, rows: int) -> None:
        owner = self.owner
        elapsed = max(owner.clock() - owner.start, 1e-9)
        total = owner.total if owner.total is None or owner.total >= owner.rows else owner.rows
        mib = f"{owner.bytes / MIB / elapsed:,.1f} MiB/s" if owner.bytes else ""
        speed = self.live.tasks[0].speed or owner.rows / elapsed
        self.live.update(self.task, advance=rows, total=total, count=f"{owner.rows:,} rows",
                         rate=f"{speed:,.0f} rows/s", mib=mib)

    def stop(self, summary: bool = True) -> None:
        """Clear the bar; then the summary line, once (it stays on the screen)."""
        if self.live.live.is_started:
            self.live.stop()
            if summary:
                self.owner.out.write(self.owner.line() + "\n")
                self.owner.out.flush()
