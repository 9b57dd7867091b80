"""The `kvstore` progress report in logs: figures from its clock, a line per interval, one summary."""
from __future__ import annotations

import io
import threading

from kvstore_client.progress import Progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_once_per_interval_with_rate_and_eta_from_the_clock():
    out, clock = io.StringIO(), Clock()
    progress = Progress("export t", total=1000, out=out, interval=10.0, bar=False, clock=clock)
    clock.now += 4
    progress.update(100, 100 << 20)                  # before the first interval: nothing drawn
    assert out.getvalue() == ""
    clock.now += 6
    progress.update(150, 150 << 20)                  # 250 rows in 10 s: 25 rows/s, 750 left = 30 s
    assert out.getvalue() == "export t: 250 rows of ~1,000 (25%), 25 rows/s, 25.0 MiB/s, ETA 0:00:30\n"
    clock.now += 5
    progress.update(250)
    assert out.getvalue().count("\n") == 1


def test_the_summary_is_written_once_and_nothing_redraws():
    out, clock = io.StringIO(), Clock()
    with Progress("import t", total=10, out=out, interval=1.0, bar=False, clock=clock) as progress:
        for _ in range(3):
            clock.now += 1
            progress.update(5)                   # passes the estimate: no percentage, no ETA beyond it
        progress.done()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 4
    assert lines[-1] == "import t: 15 rows, 5 rows/s, 0:00:03 in all"
    assert lines[-2] == "import t: 15 rows, 5 rows/s, 0:00:03 elapsed"


def test_off_when_disabled_or_not_a_terminal_without_bar():
    out = io.StringIO()
    quiet = Progress("export t", total=5, out=out, enabled=False)
    quiet.update(5)
    quiet.done()
    assert out.getvalue() == ""
    assert Progress("export t", out=io.StringIO())._bar is None      # a StringIO is no terminal


def test_a_long_call_reports_elapsed_time_each_interval():
    out, clock = io.StringIO(), Clock()
    progress = Progress("restore s", out=out, interval=0.01, bar=False, clock=clock)
    ticked = threading.Event()

    def call() -> str:
        clock.now += 42
        while "elapsed" not in out.getvalue():
            ticked.wait(0.01)
        return "restored"

    assert progress.wait(call) == "restored"
    assert out.getvalue().splitlines()[0] == "restore s: 0:00:42 elapsed"
