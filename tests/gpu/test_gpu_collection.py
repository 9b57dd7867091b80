"""The training collection with CUDA inputs: rows through pinned host memory, pooling on the device.

Runs where torch sees a CUDA device; skips everywhere else.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device for torch", allow_module_level=True)

from integration.conftest import ServerProcess  # noqa: E402  (tests/ is on the path: pytest puts it there)
from kvstore_client import KVStoreClient  # noqa: E402
from kvstore_client.collection import Feature, RemoteEmbeddingBagCollection  # noqa: E402
from kvstore_client.host_staging import HostStaging, to_host  # noqa: E402

DIM, STEPS = 8, 20


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("gpu-collection") / "data").start()
    try:
        with KVStoreClient(server.address) as opened:
            yield opened
    finally:
        assert server.stop() == 0


def _train(client: KVStoreClient, table: str, device: str) -> list[float]:
    client.create_table(table, DIM, optimizer={"name": "adagrad", "lr": 0.1},
                        initializer={"kind": "uniform", "scale": 0.1, "seed": 3})
    collection = RemoteEmbeddingBagCollection(client, [Feature("f", table, "sum")])
    torch.manual_seed(0)
    head = torch.nn.Linear(DIM, 1).to(device)
    dense = torch.optim.SGD(head.parameters(), lr=0.1)
    rng, losses = np.random.default_rng(1), []
    for _ in range(STEPS):
        ids = torch.from_numpy(rng.integers(0, 50, (32, 3))).to(device)
        out = collection({"f": ids})["f"]
        assert out.device.type == torch.device(device).type
        loss = (head(out) ** 2).mean()
        dense.zero_grad()
        loss.backward()
        dense.step()
        losses.append(loss.item())
    collection.close()
    return losses


def test_cuda_inputs_train_as_cpu_inputs(client):
    on_gpu, on_cpu = _train(client, "gpu_coll", "cuda"), _train(client, "cpu_coll", "cpu")
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-5)
    np.testing.assert_allclose(client.lookup("gpu_coll", np.arange(50)), client.lookup("cpu_coll", np.arange(50)),
                               rtol=1e-5, atol=1e-6)


def test_staged_rows_are_pinned_and_round_trip(client):
    staging = HostStaging()
    rows = staging.allocate((4, DIM), np.dtype(np.float32))
    rows[:] = np.arange(4 * DIM, dtype=np.float32).reshape(4, DIM)
    tensor = torch.from_numpy(rows)
    assert tensor.is_pinned()
    on_device = staging.upload(tensor, torch.device("cuda"))
    staging.release()
    np.testing.assert_array_equal(to_host(on_device * 2), rows * 2)
