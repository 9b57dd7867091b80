"""The live database and its tables, pinned by the calls that use them.

A restore opens another database and swaps in a new `Generation`; calls in
flight keep the one they pinned and finish on it. The retired generation is
closed (and its directory removed) once the last pin is released, on a
background thread, so neither a restore nor the call that released the last
pin waits for RocksDB to close (which waits for its background jobs).
"""
from __future__ import annotations

import shutil
import threading

from .errors import StoreClosed, TableNotFound
from .rocks_tier import RocksTier
from .table import Table
from .thread_names import os_named
from .writer import Writer


class Generation:
    def __init__(self, rocks: RocksTier, tables: dict[str, Table], writer: Writer | None = None):
        self.rocks = rocks
        self.tables = tables
        self.writer = writer
        self.users = 0
        self.retired = False
        self.remove_dir = False    # delete the database directory once closed

    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            raise TableNotFound(f"table: no table named {name!r}") from None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.drain()       # rows the writer still holds for this database go first
        self.rocks.close()
        if self.remove_dir:
            shutil.rmtree(self.rocks.path, ignore_errors=True)


class Generations:
    """Holds the live generation; `pin` lends it to one call, `swap` replaces it."""

    def __init__(self, live: Generation):
        self._cond = threading.Lock()                  # nobody waits on it: the last release retires
        self._live: Generation | None = live
        self._closers: list[threading.Thread] = []

    @property
    def live(self) -> Generation:
        live = self._live
        if live is None:
            raise StoreClosed("store: closed")
        return live

    def pin(self) -> _Pinned:
        """`with gens.pin() as gen:` the live generation, lent until the block ends (a small
        class, not a generator: every row call passes through here)."""
        return _Pinned(self)

    def acquire(self) -> Generation:
        """Pin without a context manager (for iterators); pair with `release`."""
        with self._cond:
            gen = self.live
            gen.users += 1
            return gen

    def release(self, gen: Generation) -> None:
        with self._cond:
            gen.users -= 1
            last = gen.retired and gen.users == 0
        if last:
            self._retire(gen)

    def swap(self, new: Generation, remove_old_dir: bool = True) -> None:
        """Make `new` live; the old one closes when its last pin is released."""
        with self._cond:
            old = self.live
            self._live = new
            old.retired = True
            old.remove_dir = remove_old_dir
            idle = old.users == 0
        if idle:
            self._retire(old)

    def _retire(self, gen: Generation) -> None:
        closer = threading.Thread(target=os_named(gen.close), name="kvstore-retire", daemon=True)
        with self._cond:
            self._closers = [t for t in self._closers if t.is_alive()] + [closer]
        closer.start()

    def join_retired(self) -> None:
        """Wait until every retired generation with no pins left is closed."""
        with self._cond:
            closers = list(self._closers)
        for closer in closers:
            closer.join()

    def shut(self) -> Generation | None:
        """Stop lending; returns the generation that was live (the caller closes it)."""
        with self._cond:
            live, self._live = self._live, None
            return live


class _Pinned:
    __slots__ = ("_gens", "_gen")

    def __init__(self, gens: Generations):
        self._gens = gens

    def __enter__(self) -> Generation:
        self._gen = self._gens.acquire()
        return self._gen

    def __exit__(self, *exc_info) -> None:
        self._gens.release(self._gen)
