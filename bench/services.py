"""The processes a run starts: kvstore-server on a data directory, and Redis (the peer) on a free
loopback port. Redis is optional: when `redis-server` or the `redis` package is missing, the run
says so and goes on without it."""
from __future__ import annotations

import functools
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kvstore.rows import encode_keys

from .echo import start_process
from .report import python_env

REDIS_CHUNK = 4096          # keys per MGET / MSET command; commands are pipelined


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@functools.cache
def compiled_loops_on_disk() -> None:
    """Compile (or load) the host cache's loops once, in a process of their own, before a server
    starts: Numba caches them on disk, so the server loads them. Otherwise a checkout's first
    server compiles them in the background, about 15 s of CPU on 2 cores, while it already
    answers, and a bench times that (the first cell of a fresh machine's first run fell from
    1.88-2.41x with the loops cached to 1.69x). Not in the bench's own process, whose calls are measured too."""
    subprocess.run([sys.executable, "-c", "from kvstore import host_kernels; host_kernels.warm()"],
                   check=True, env=python_env())


class KvstoreServer:
    """`python -m kvstore_server` on `data_dir`, any free port, no metrics endpoint."""

    def __init__(self, data_dir: str | Path):
        compiled_loops_on_disk()
        self.proc, self.address = start_process([sys.executable, "-m", "kvstore_server", "--data-dir",
                                                 str(data_dir), "--port", "0", "--metrics-port", "0"])

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def redis_missing() -> str | None:
    """Why the Redis peer cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server not found (Debian: apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install -e '.[bench]')"
    return None


class RedisConnection:
    """Rows as binary values keyed by 8-byte ids; reads and writes are pipelined MGET / MSET (hiredis
    parses replies when installed)."""

    def __init__(self, port: int):
        import redis

        self.port = port
        self.client = redis.Redis(host="127.0.0.1", port=port)

    def mget(self, ids: np.ndarray, dim: int, dtype=np.float32) -> np.ndarray:
        keys = encode_keys(ids)
        pipe = self.client.pipeline(transaction=False)
        for i in range(0, len(keys), REDIS_CHUNK):
            pipe.execute_command("MGET", *keys[i:i + REDIS_CHUNK])
        values = [v for part in pipe.execute() for v in part]
        if any(v is None for v in values):
            raise KeyError("redis: some ids have no row")
        return np.frombuffer(b"".join(values), dtype).reshape(len(ids), dim)

    def mset(self, ids: np.ndarray, rows: np.ndarray) -> None:
        keys = encode_keys(ids)
        values = np.ascontiguousarray(rows).view(f"V{rows[:1].nbytes}").ravel().tolist()
        pipe = self.client.pipeline(transaction=False)
        for i in range(0, len(keys), REDIS_CHUNK):
            flat = [x for pair in zip(keys[i:i + REDIS_CHUNK], values[i:i + REDIS_CHUNK], strict=True) for x in pair]
            pipe.execute_command("MSET", *flat)
        pipe.execute()

    def close(self) -> None:
        self.client.close()


class RedisPeer(RedisConnection):
    """A private redis-server on a free loopback port, no persistence unless asked."""

    def __init__(self, workdir: str | Path):
        import redis

        port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--dbfilename", "bench.rdb", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        super().__init__(port)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    stop_process(self.proc)
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    @staticmethod
    def versions() -> dict:
        import redis

        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
        version = next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), out.strip())
        return {"redis-server": version, "hiredis in use": bool(redis.utils.HIREDIS_AVAILABLE)}

    def load(self, ids: np.ndarray, rows: np.ndarray, chunk: int = 1 << 16) -> None:
        for i in range(0, len(ids), chunk):
            self.mset(ids[i:i + chunk], rows[i:i + chunk])

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def flush(self) -> None:
        self.client.flushall()

    def stop(self) -> None:
        self.close()
        stop_process(self.proc)
