"""Fixtures: a real kvstore-server in a separate process on a loopback port, and a client.

One server per test module (module-scoped) keeps the suite fast; tests that
restart or reconfigure a server start their own through `start_server`.
"""
from __future__ import annotations

import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from kvstore_client import KVStoreClient

START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python -m kvstore_server` on a data directory; `address` once it printed its listening line."""

    def __init__(self, data_dir: Path, *args: str, metrics_port: int = 0):
        self.data_dir = Path(data_dir)
        self.args = list(args)
        self.metrics_port = metrics_port
        self.log = self.data_dir.parent / f"{self.data_dir.name}-server.log"
        self.process: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> ServerProcess:
        command = [sys.executable, "-m", "kvstore_server", "--data-dir", str(self.data_dir), "--port", "0",
                   "--metrics-port", str(self.metrics_port), *self.args]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        line = self._read_line(START_TIMEOUT)
        if not line.startswith("kvstore-server listening on "):
            self.process.kill()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log.read_text()}")
        self.address = line.rsplit(" ", 1)[1].strip()
        return self

    def _read_line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        return self.process.stdout.readline() if ready else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        self.process.stdout.close()
        return code

    def restart(self) -> ServerProcess:
        code = self.stop()
        assert code == 0, f"server exited with {code}:\n{self.log.read_text()}"
        return self.start()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Factory: start a server (own data dir unless given); each must exit 0 on SIGTERM at teardown."""
    started: list[ServerProcess] = []

    def start(*args: str, data_dir: Path | None = None, metrics_port: int = 0) -> ServerProcess:
        directory = data_dir or tmp_path_factory.mktemp("server") / "data"
        server = ServerProcess(directory, *args, metrics_port=metrics_port).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.alive():
            code = server.stop()
            assert code == 0, f"server exited with {code}:\n{server.log.read_text()}"


@pytest.fixture(scope="module")
def server(start_server) -> ServerProcess:
    return start_server(metrics_port=free_port())


@pytest.fixture(scope="module")
def client(server):
    with KVStoreClient(server.address, timeout=30.0) as opened:
        yield opened


def small_table(client: KVStoreClient, name: str, dim: int = 8, **kwargs) -> dict:
    """A table with a small cache, so tests stay light."""
    kwargs.setdefault("cache", {"rows": 256, "ways": 8})
    return client.create_table(name, dim, **kwargs)


def random_rows(n: int, dim: int, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    from kvstore_proto.tensors import WIRE_DTYPES

    return np.random.default_rng(seed).standard_normal((n, dim)).astype(WIRE_DTYPES[dtype])


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False



def completed(requests) -> list:
    """The chunks of a streamed write with the final one marked `last`, as the client library sends
    them: the server applies a streamed write only after its chunk marked last."""
    chunks = list(requests)
    final = chunks[-1] if chunks else None
    fields = getattr(type(final), "DESCRIPTOR", None)          # raw bytes (a malformed chunk) have none
    if fields is not None and "rows" in fields.fields_by_name:  # ImportChain: the mark is on its rows
        final, fields = final.rows, final.rows.DESCRIPTOR
    if fields is not None and "last" in fields.fields_by_name:
        final.last = True
    return chunks


class TwoThenHold:
    """Yields two chunks, says so, then blocks until released (the third chunk never goes)."""

    def __init__(self, chunks: list):
        self.chunks = chunks
        self.asked_for_third = threading.Event()
        self.release = threading.Event()

    def __iter__(self):
        yield from self.chunks[:2]
        self.asked_for_third.set()        # grpc asks for the next chunk once the previous one was sent
        self.release.wait(60)
