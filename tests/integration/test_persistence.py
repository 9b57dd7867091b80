"""What survives a restart of the server on the same data directory."""
from __future__ import annotations

import numpy as np
import pytest
from kvstore_client import KVStoreClient

from .conftest import random_rows

DTYPES = ["float32", "float16", "bfloat16", "float64"]
WRITES = ["write_back", "write_through"]
IDS = np.array([0, 1, -1, 1 << 62, 12345], dtype=np.int64)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


def restarted(server) -> KVStoreClient:
    server.restart()                     # SIGTERM, exit code 0 checked, start on the same data dir
    return KVStoreClient(server.address)


def test_rows_read_back_exactly_before_and_after_restart(server):
    written, configs = {}, {}
    with KVStoreClient(server.address) as client:
        for dtype in DTYPES:
            for write in WRITES:
                name = f"{dtype}_{write}"
                configs[name] = client.create_table(name, 16, dtype=dtype, cache={"rows": 64, "ways": 8,
                                                                                   "write": write})
                written[name] = random_rows(len(IDS), 16, dtype, seed=len(written))
                client.update(name, IDS, written[name])
                back = client.lookup(name, IDS, on_miss="error")
                assert back.dtype == written[name].dtype
                np.testing.assert_array_equal(back.view(np.uint8), written[name].view(np.uint8))
    with restarted(server) as client:
        assert sorted(client.list_tables()) == sorted(written)
        for name, rows in written.items():
            assert client.describe_table(name) == configs[name]
            back = client.lookup(name, IDS[::-1], on_miss="error")
            np.testing.assert_array_equal(back.view(np.uint8), rows[::-1].view(np.uint8))


def test_initial_rows_are_the_same_after_restart(server):
    with KVStoreClient(server.address) as client:
        client.create_table("init_seeded", 8, initializer={"kind": "uniform", "scale": 1.0, "seed": 99})
        before = client.lookup("init_seeded", IDS, on_miss="init")
    with restarted(server) as client:
        np.testing.assert_array_equal(client.lookup("init_seeded", IDS, on_miss="init"), before)


def test_sigterm_flushes_dirty_write_back_rows(server):
    rows = random_rows(200, 8, seed=5)
    with KVStoreClient(server.address) as client:
        client.create_table("dirty", 8, cache={"rows": 1024, "ways": 8, "write": "write_back"})
        client.update("dirty", np.arange(200), rows)
        assert client.stats("dirty")["cache_dirty_rows"] == 200     # only in the cache so far
    with restarted(server) as client:
        np.testing.assert_array_equal(client.lookup("dirty", np.arange(200), on_miss="error"), rows)
        assert client.stats("dirty")["cache_dirty_rows"] == 0
