"""Exports read by worker processes from a checkpoint and large imports whose SST files a worker
process writes, through a real server: what they hold, what an export writes (nothing), and
that a finished, cancelled, failed or orphaned export or import leaves no worker at work and no
file behind (one started worker waits, holding nothing, for the next transfer)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from kvstore_client import InvalidArgumentError, KVStoreClient, NotFoundError, UnavailableError

from .conftest import random_rows, small_table, wait_until

DIM = 64
ROWS = 20_000          # several MiB of chunks: more than the pipe and gRPC buffers hold, so the worker waits


def export_workers(pid: int) -> list[int]:
    """Pids of the transfer worker processes (exports, imports) of the server process `pid`."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            children += [int(child) for child in listing.read().split()]
    return [child for child in children if b"transfer_worker.py" in _cmdline(child)]


def busy_workers(server) -> list[int]:
    """The workers holding a file of the server's staging directory open (a checkpoint they read,
    an SST file they write): the worker waiting for the next transfer holds none."""
    staging = os.path.realpath(server.data_dir / "staging") + os.sep
    return [pid for pid in export_workers(server.process.pid) if any(path.startswith(staging)
                                                                     for path in _open_files(pid))]


def _open_files(pid: int) -> list[str]:
    paths = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except FileNotFoundError:
                pass
    except FileNotFoundError:
        pass
    return paths


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as src:
            return src.read()
    except FileNotFoundError:
        return b""


def gone(pid: int) -> bool:
    """The process exited (a zombie waiting for a parent that will not reap it counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as src:
            return src.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def staging_left(data_dir: Path) -> list[str]:
    staging = data_dir / "staging"
    return sorted(os.listdir(staging)) if staging.exists() else []


def loaded_table(client: KVStoreClient, name: str) -> np.ndarray:
    small_table(client, name, dim=DIM)
    weights = random_rows(ROWS, DIM, seed=3)
    client.import_table(name, np.arange(ROWS), weights)
    return weights


def test_export_holds_unsaved_rows_at_its_instant_and_writes_none(client, server):
    small_table(client, "exw_dirty", cache={"rows": 4096, "ways": 8, "flush_seconds": 3600.0})
    ids = np.arange(1000)
    client.update("exw_dirty", ids, np.full((1000, 8), 1.0, np.float32))
    dirty = client.stats("exw_dirty")["cache_dirty_rows"]
    assert dirty >= 900                               # a few may have left the cache through the writer
    stream = client.export("exw_dirty", chunk_rows=100)
    chunks = iter(stream)
    first = next(chunks)                              # the cut is made: later writes are not in it
    client.update("exw_dirty", ids, np.full((1000, 8), 2.0, np.float32))
    parts = [first, *chunks]
    assert np.concatenate([p.ids for p in parts]).tolist() == ids.tolist()
    assert (np.concatenate([p.weights for p in parts]) == 1.0).all()
    assert client.stats("exw_dirty")["cache_dirty_rows"] == dirty, "the export wrote dirty rows back"
    assert wait_until(lambda: not busy_workers(server) and not staging_left(server.data_dir))


def test_next_export_is_read_by_the_worker_started_ahead_of_it_which_held_nothing(client, server):
    weights = loaded_table(client, "exw_spare")
    assert np.array_equal(client.export_table("exw_spare").weights, weights)
    assert wait_until(lambda: len(export_workers(server.process.pid)) == 1 and not busy_workers(server))
    (waiting,) = export_workers(server.process.pid)        # started during the export, for the next one
    stream = client.export("exw_spare", chunk_rows=64)
    chunks = iter(stream)
    first = next(chunks)
    assert busy_workers(server) == [waiting]
    assert np.array_equal(np.concatenate([first.weights, *(c.weights for c in chunks)]), weights)
    assert wait_until(lambda: not busy_workers(server) and len(export_workers(server.process.pid)) == 1)


def test_cancelled_export_stops_its_worker_and_removes_its_checkpoint(client, server):
    loaded_table(client, "exw_cancel")
    stream = client.export("exw_cancel", chunk_rows=64)
    next(iter(stream))
    assert busy_workers(server), "the worker finished before the test could cancel it"
    stream.cancel()
    assert wait_until(lambda: not busy_workers(server) and not staging_left(server.data_dir))
    assert len(client.export_table("exw_cancel").ids) == ROWS        # the server exports as before


def test_export_whose_worker_dies_fails_with_unavailable_and_leaves_nothing(client, server):
    weights = loaded_table(client, "exw_killed")
    stream = client.export("exw_killed", chunk_rows=64)
    chunks = iter(stream)
    next(chunks)
    (worker,) = busy_workers(server)
    os.kill(worker, signal.SIGKILL)
    with pytest.raises(UnavailableError, match="worker"):
        list(chunks)
    assert wait_until(lambda: not busy_workers(server) and not staging_left(server.data_dir))
    again = client.export_table("exw_killed")
    assert np.array_equal(again.weights, weights)


def test_export_worker_exits_with_its_killed_server_and_the_restart_removes_the_checkpoint(start_server):
    server = start_server()
    with KVStoreClient(server.address, timeout=30.0) as client:
        weights = loaded_table(client, "exw_orphan")
        stream = client.export("exw_orphan", chunk_rows=64)
        next(iter(stream))
        workers = export_workers(server.process.pid)
        assert workers and staging_left(server.data_dir)
        server.process.kill()
        server.process.wait()
        assert wait_until(lambda: all(gone(pid) for pid in workers)), "an export worker outlived its server"
    server.start()
    assert staging_left(server.data_dir) == []
    with KVStoreClient(server.address, timeout=30.0) as client:
        assert np.array_equal(client.export_table("exw_orphan").weights, weights)


IMPORT_ROWS = 20_000      # rows per chunk of the large imports: the fifth passes the store's WORKER_ROWS


def large_import(server, client: KVStoreClient, table: str, last_chunk):
    """Chunks of an import that, once the server writes with a worker, yield `last_chunk()` (the
    client sends a chunk once it has the next, to mark the final one: one small chunk follows the
    large ones before the wait)."""
    weights = random_rows(5 * IMPORT_ROWS, 8, seed=5)
    for index in range(5):
        part = slice(index * IMPORT_ROWS, (index + 1) * IMPORT_ROWS)
        yield np.arange(part.start, part.stop), weights[part]
    yield np.arange(10**6 - 10, 10**6), np.zeros((10, 8), np.float32)
    assert wait_until(lambda: busy_workers(server)), "no worker wrote the large import"
    yield last_chunk(weights)


def test_large_import_written_by_a_worker_is_bit_exact_and_leaves_nothing(client, server):
    small_table(client, "imw_ok")
    extra = np.arange(10**6, 10**6 + 10)
    rows = client.import_chunks("imw_ok", large_import(
        server, client, "imw_ok", lambda w: (extra, np.ones((10, 8), np.float32))))
    assert rows == 5 * IMPORT_ROWS + 20
    got = client.export_table("imw_ok")
    assert np.array_equal(got.weights[:5 * IMPORT_ROWS], random_rows(5 * IMPORT_ROWS, 8, seed=5))
    assert got.ids[-10:].tolist() == extra.tolist() and len(got.ids) == 5 * IMPORT_ROWS + 20
    assert wait_until(lambda: not busy_workers(server) and not staging_left(server.data_dir))


def test_failed_large_import_changes_nothing_and_stops_its_worker(client, server):
    with pytest.raises(InvalidArgumentError, match="weights"):
        client.import_chunks("imw_bad", large_import(
            server, client, "imw_bad", lambda w: (np.arange(10**6, 10**6 + 10), np.ones((10, 3), np.float32))),
            config={"name": "imw_bad", "dim": 8})
    assert wait_until(lambda: not busy_workers(server) and not staging_left(server.data_dir))
    with pytest.raises(NotFoundError):
        client.describe_table("imw_bad")            # the table the import created is gone again


def test_import_worker_exits_with_its_killed_server(start_server):
    server = start_server()
    with KVStoreClient(server.address, timeout=30.0) as client:
        small_table(client, "imw_orphan")
        seen: list[int] = []

        def kill_server(_weights):
            seen.extend(export_workers(server.process.pid))
            server.process.kill()
            server.process.wait()
            return np.arange(10**6, 10**6 + 10), np.ones((10, 8), np.float32)

        with pytest.raises(UnavailableError):
            client.import_chunks("imw_orphan", large_import(server, client, "imw_orphan", kill_server))
        assert seen and wait_until(lambda: all(gone(pid) for pid in seen)), "an import worker outlived its server"
    server.start()
    assert staging_left(server.data_dir) == []
    with KVStoreClient(server.address, timeout=30.0) as client:
        assert len(client.export_table("imw_orphan").ids) == 0     # nothing of the import was applied
