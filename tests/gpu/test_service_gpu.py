"""A GPU table through the service: created by a client on a server whose default device is the GPU, it
keeps the rows a host table of the same config keeps, through lookups, updates, every optimizer's steps,
and a kill -9 restart (write-through)."""
from __future__ import annotations

import numpy as np
import pytest
from integration.conftest import start_server  # noqa: F401 - the fixture
from kvstore_client import KVStoreClient

from .conftest import require_gpu

cupy = require_gpu()

OPTIMIZERS = ["sgd", "adagrad", "rowwise_adagrad", "adam", "partial_rowwise_adam"]
DIM = 16
IDS = 3000           # ids drawn from [-IDS, IDS): far more than the 256 cache slots, so rows are evicted


def create_pair(client: KVStoreClient, name: str, optimizer: str, write: str) -> tuple[str, str]:
    """Tables `gpu_<name>` (no device: the server's default, the GPU) and `host_<name>` (device cpu),
    the same config otherwise."""
    options = {"optimizer": {"name": optimizer, "lr": 0.05}, "initializer": {"kind": "uniform", "scale": 0.1}}
    cache = {"rows": 256, "ways": 32, "write": write}
    gpu = client.create_table(f"gpu_{name}", DIM, cache=cache, **options)
    host = client.create_table(f"host_{name}", DIM, cache={**cache, "device": "cpu"}, **options)
    assert (gpu["cache"]["device"], host["cache"]["device"]) == ("cuda", "cpu")
    return f"gpu_{name}", f"host_{name}"


def close(got, want, tolerance: float = 1e-5) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    assert np.linalg.norm(got - want) <= tolerance * max(np.linalg.norm(want), 1e-30)


def same_rows(client: KVStoreClient, gpu: str, host: str, ids: np.ndarray, on_miss: str = "init_insert") -> None:
    gpu_weights, gpu_state = client.lookup(gpu, ids, on_miss=on_miss, with_state=True)
    host_weights, host_state = client.lookup(host, ids, on_miss=on_miss, with_state=True)
    close(gpu_weights, host_weights)
    close(gpu_state, host_state)


def train(client: KVStoreClient, gpu: str, host: str, batches: int, seed: int) -> np.ndarray:
    """Lookups, gradient steps (duplicate ids included) and some updates on both tables; every id touched."""
    rng = np.random.default_rng(seed)
    touched = []
    for batch in range(batches):
        ids = rng.integers(-IDS, IDS, 700)
        touched.append(ids)
        same_rows(client, gpu, host, ids)
        grads = rng.standard_normal((len(ids), DIM)).astype(np.float32)
        assert client.apply_gradients(gpu, ids, grads) == client.apply_gradients(host, ids, grads)
        if batch % 4 == 1:
            new = rng.standard_normal((50, DIM)).astype(np.float32)
            assert client.update(gpu, ids[:50], new) == client.update(host, ids[:50], new)
    return np.unique(np.concatenate(touched))


@pytest.fixture(scope="module")
def server(start_server):  # noqa: F811 - the imported fixture
    return start_server("--cache-device", "cuda")


@pytest.fixture(scope="module")
def client(server):
    with KVStoreClient(server.address, timeout=60) as opened:
        yield opened


def test_describe_shows_the_device_and_the_host_tier(client):
    client.create_table("tiered", DIM, cache={"rows": 256, "ways": 32, "host_rows": 1024, "host_policy": "lfu"})
    cache = client.describe_table("tiered")["cache"]
    assert (cache["device"], cache["host_rows"], cache["host_policy"]) == ("cuda", 1024, "lfu")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_gpu_table_matches_host_table_through_the_service(client, optimizer):
    gpu, host = create_pair(client, optimizer, optimizer, "write_back")
    assert client.describe_table(gpu)["cache"]["device"] == "cuda"
    touched = train(client, gpu, host, batches=20, seed=OPTIMIZERS.index(optimizer))
    same_rows(client, gpu, host, touched, on_miss="error")          # every row written, none lost to eviction


def test_gpu_table_keeps_acknowledged_writes_through_kill_9_with_write_through(start_server, tmp_path):  # noqa: F811
    data_dir = tmp_path / "data"
    server = start_server("--cache-device", "cuda", data_dir=data_dir)
    with KVStoreClient(server.address, timeout=60) as client:
        gpu, host = create_pair(client, "durable", "adam", "write_through")
        touched = train(client, gpu, host, batches=10, seed=99)
        acknowledged = client.lookup(gpu, touched, on_miss="error", with_state=True)
    server.process.kill()                              # kill -9: no flush, no graceful close
    server.process.wait(60)
    server.process.stdout.close()
    restarted = start_server("--cache-device", "cuda", data_dir=data_dir)
    with KVStoreClient(restarted.address, timeout=60) as client:
        assert client.describe_table(gpu)["cache"]["device"] == "cuda"
        weights, state = client.lookup(gpu, touched, on_miss="error", with_state=True)
        np.testing.assert_array_equal(weights, acknowledged[0])    # write-through: every write in RocksDB
        np.testing.assert_array_equal(state, acknowledged[1])
        same_rows(client, gpu, host, touched, on_miss="error")
        train(client, gpu, host, batches=3, seed=100)               # and it trains on after the restart


def test_three_tiers_and_a_snapshot_through_the_service(client):
    """A 64-slot GPU tier over a 128-slot host tier keeps a host table's rows through the service;
    a snapshot taken meanwhile brings both back to the same rows."""
    options = {"optimizer": {"name": "adagrad", "lr": 0.05}, "initializer": {"kind": "uniform", "scale": 0.1}}
    client.create_table("tiers3", DIM, cache={"rows": 64, "ways": 32, "host_rows": 128}, **options)
    client.create_table("tiers3_host", DIM, cache={"rows": 1024, "ways": 32, "device": "cpu"}, **options)
    touched = train(client, "tiers3", "tiers3_host", 12, seed=5)
    stats = client.stats("tiers3")
    assert stats["host_tier_rows"] > 0 and stats["host_tier_reads"] > 0
    client.create_snapshot("three_tiers")
    kept = client.lookup("tiers3", touched, on_miss="zeros")
    train(client, "tiers3", "tiers3_host", 3, seed=6)
    client.restore_snapshot("three_tiers")
    close(client.lookup("tiers3", touched, on_miss="zeros"), kept)
    same_rows(client, "tiers3", "tiers3_host", touched, on_miss="zeros")


def test_a_gpu_tables_rows_through_the_doorbell_equal_the_network_path(server, client):
    """NumPy ids from a client on the server's machine: a GPU table's lookups go over the doorbell,
    whose connection thread gathers cached rows on the device into the client's segment (or hands
    a batch with misses to the event loop); the rows equal the network path's through updates and
    gradient steps."""
    gpu, host = create_pair(client, "doorbell", "rowwise_adagrad", "write_back")
    rng = np.random.default_rng(21)
    with KVStoreClient(server.address, timeout=60, same_host=True) as shm:
        for _ in range(12):
            ids = rng.integers(0, 200, 150)                         # within the 256 slots: most batches all cached
            np.testing.assert_array_equal(shm.lookup(gpu, ids), client.lookup(gpu, ids))
            close(shm.lookup(gpu, ids), shm.lookup(host, ids))
            grads = rng.standard_normal((len(ids), DIM)).astype(np.float32)
            assert client.apply_gradients(gpu, ids, grads) == client.apply_gradients(host, ids, grads)
        assert shm.same_host.doorbell is not None
