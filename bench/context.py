"""What the suites of one run share: the scratch directory, the result log, and the comparator
processes (Redis, the bare gRPC server), each started once, on first use, and stopped at the end."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from .echo import EchoClient, start_echo
from .report import ResultLog
from .services import RedisPeer, redis_missing, stop_process

CHUNK_BYTES = 2 << 20       # the kvstore client's default chunk size; the echo client uses the same


class Context:
    def __init__(self, log: ResultLog, quick: bool, scratch: str | None = None, sizes: list[int] | None = None):
        self.log = log
        self.quick = quick
        self.sizes = sizes          # lookup: table sizes instead of the plan's
        self.reps = 1 if quick else 5        # quick checks that suites run and agree, not timings
        self.scratch = Path(tempfile.mkdtemp(prefix="kvstore-bench-", dir=scratch))
        self._redis: RedisPeer | None = None
        self._redis_why: str | None = None
        self._echo = None
        self._echo_client: EchoClient | None = None

    def tmpdir(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.scratch))

    def redis(self, suite: str) -> RedisPeer | None:
        """The Redis peer, emptied; None (and a line saying why) when it cannot run here."""
        if self._redis is None and self._redis_why is None:
            self._redis_why = redis_missing()
            if self._redis_why is None:
                self._redis = RedisPeer(self.tmpdir("redis-"))
                self.log.env.setdefault("versions", {}).update(RedisPeer.versions())
        if self._redis is None:
            self.log.note(suite, f"Redis peer skipped: {self._redis_why}")
            return None
        self._redis.flush()
        return self._redis

    def echo(self) -> EchoClient:
        """A client of the bare gRPC server (started once)."""
        if self._echo_client is None:
            self._echo, address = start_echo()
            self._echo_client = EchoClient(address, CHUNK_BYTES)
        return self._echo_client

    def close(self) -> None:
        if self._echo_client is not None:
            self._echo_client.close()
            stop_process(self._echo)
        if self._redis is not None:
            self._redis.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)


def table_weights(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """The rows every system holds: float32 normal values (they do not compress)."""
    return np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)


def cache_slots(rows: int, load: float, ways: int = 32) -> int:
    """Cache slots for `rows` rows at `load` (slots used / slots), a multiple of the ways."""
    return max(ways, -(-int(rows / load) // ways) * ways)
