"""The event loop the server runs on: uvloop where installed, else asyncio's own.

Each gRPC operation of the asyncio server completes through the loop: grpcio's
poller thread hands completions over through a socket the loop watches, and the
waiting coroutine resumes in a later iteration, so a one-chunk Lookup takes about
18 loop iterations. uvloop runs that machinery (selector, ready queue, callbacks)
in C rather than in Python; docs/benchmarks.md has the measured difference.
`event_loop: asyncio` forces the standard loop (to debug, or to compare);
`uvloop` insists on uvloop; `auto` takes uvloop when it is installed.
"""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from kvstore.errors import FailedPrecondition

T = TypeVar("T")


def run_event_loop(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """Run `main` to completion on the loop `choice` names (auto | uvloop | asyncio)."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                main.close()
                raise FailedPrecondition("event_loop: uvloop is not installed; install the server extra "
                                         "or set event_loop to auto or asyncio") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)
