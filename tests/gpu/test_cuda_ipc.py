"""CUDA IPC on the same-host path: a trainer's CUDA tensors and a GPU table's server on one machine.

Lookups of CUDA ids come back as CUDA tensors the server wrote through a GPU buffer of the client's;
gradients and updates of CUDA tensors are read by the server from one. Rows equal those of a host
table driven by a network client with the same inputs. Hostile attaches are refused with a reason,
and a client killed with its buffers open leaves the server serving."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest
from integration.conftest import start_server  # noqa: F401 - the fixture
from kvstore_client import KVStoreClient
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc

from .conftest import require_gpu
from .test_service_gpu import DIM, IDS, close, create_pair

require_gpu()
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("torch has no CUDA here", allow_module_level=True)

from kvstore_client.device_memory import DeviceBuffer  # noqa: E402 - after the skips

CUDA = torch.device("cuda:0")


@pytest.fixture(scope="module")
def server(start_server):  # noqa: F811 - the imported fixture
    return start_server("--cache-device", "cuda")


@pytest.fixture(scope="module")
def trainer(server):
    """A client next to the server, with CUDA tensors: rows through GPU buffers."""
    with KVStoreClient(server.address, timeout=60, same_host=True) as opened:
        yield opened


@pytest.fixture(scope="module")
def remote(server):
    """The same inputs over the network, as NumPy arrays, to a host table."""
    with KVStoreClient(server.address, timeout=60) as opened:
        yield opened


def gpu_buffers_in_use(client: KVStoreClient) -> int:
    pool = client.same_host.device_pool(CUDA)
    assert pool is not None, client.same_host.device_reason
    return len(pool._free)


def test_the_server_names_each_gpu_by_all_16_bytes_of_its_uuid_as_its_clients_do():
    """The UUID an attach names is matched against the driver's, every byte: a UUID with a zero
    byte in it (CuPy's device properties cut it there) still finds its GPU."""
    from kvstore_server.device_buffers import _device_of, device_uuid

    for device in range(torch.cuda.device_count()):
        theirs = bytes.fromhex(str(torch.cuda.get_device_properties(device).uuid).replace("-", ""))
        assert device_uuid(device) == theirs and _device_of(theirs) == device


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_cuda_tensors_train_a_gpu_table_as_numpy_trains_a_host_table(trainer, remote, optimizer):
    gpu, host = create_pair(trainer, f"ipc_{optimizer}", optimizer, "write_back")
    rng = np.random.default_rng(3)
    touched = []
    for step in range(12):
        ids = rng.integers(-IDS, IDS, 700)                 # duplicates, misses and evictions (256 slots)
        touched.append(ids)
        rows = trainer.lookup(gpu, torch.from_numpy(ids).to(CUDA))
        assert rows.is_cuda and rows.dtype == torch.float32
        close(rows.cpu().numpy(), remote.lookup(host, ids))
        grads = rng.standard_normal((len(ids), DIM)).astype(np.float32)
        assert (trainer.apply_gradients(gpu, torch.from_numpy(ids).to(CUDA), torch.from_numpy(grads).to(CUDA))
                == remote.apply_gradients(host, ids, grads))
        if step % 4 == 1:
            new = rng.standard_normal((50, DIM)).astype(np.float32)
            assert trainer.update(gpu, torch.from_numpy(ids[:50]).to(CUDA), torch.from_numpy(new).to(CUDA)) == \
                remote.update(host, ids[:50], new)
    assert gpu_buffers_in_use(trainer) >= 1 and trainer.same_host.device_reason == ""
    touched = np.unique(np.concatenate(touched))
    out = torch.empty((len(touched), DIM), device=CUDA)
    assert trainer.lookup(gpu, torch.from_numpy(touched).to(CUDA), on_miss="error", out=out) is out
    close(out.cpu().numpy(), remote.lookup(host, touched, on_miss="error"))


def test_cached_rows_come_back_exactly_and_bfloat16_keeps_its_bits(trainer, remote):
    trainer.create_table("ipc_bf16", DIM, dtype="bfloat16", cache={"rows": 4096, "ways": 32},
                         initializer={"kind": "uniform", "scale": 0.5})
    ids = np.arange(-500, 1500, 3)
    first = trainer.lookup("ipc_bf16", torch.from_numpy(ids).to(CUDA))          # misses: created, copied up
    again = trainer.lookup("ipc_bf16", torch.from_numpy(ids).to(CUDA))          # hits: gathered into the buffer
    assert first.dtype == torch.bfloat16 and torch.equal(first, again)
    over_network = remote.lookup("ipc_bf16", ids)
    assert np.array_equal(again.view(torch.int16).cpu().numpy(), over_network.view(np.int16))


def test_a_host_table_answers_cuda_ids_on_the_gpu_through_the_segment(trainer, remote):
    trainer.create_table("ipc_host", DIM, cache={"rows": 256, "ways": 8, "device": "cpu"})
    ids = np.arange(100)
    rows = trainer.lookup("ipc_host", torch.from_numpy(ids).to(CUDA))
    assert rows.is_cuda
    assert np.array_equal(rows.cpu().numpy(), remote.lookup("ipc_host", ids))


def attach(stub, buffer: DeviceBuffer, **changes) -> pb.AttachSegmentResponse:
    token = b"0123456789abcdef"
    buffer.write_token(token)
    fields = {"buffer": buffer.name, "handle": buffer.handle, "size": buffer.size, "device_uuid": buffer.uuid,
              "token": token, **changes}
    return stub.AttachDeviceBuffer(pb.AttachDeviceBufferRequest(**fields))


def test_a_buffer_claimed_larger_than_allocated_or_without_its_token_is_refused(server, trainer):
    buffer = DeviceBuffer(1 << 20, CUDA)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.EmbeddingStoreStub(channel)
            larger = attach(stub, buffer, size=1 << 30)
            wrong_token = attach(stub, buffer, token=b"x" * 16)
            other_gpu = attach(stub, buffer, device_uuid=b"\x01" * 16)
            good = attach(stub, buffer)
            stub.DetachSegment(pb.DetachSegmentRequest(segment=buffer.name))
    finally:
        buffer.close()
    assert not larger.attached and "spans" in larger.reason
    assert not wrong_token.attached and "token" in wrong_token.reason
    assert not other_gpu.attached and "not one this server sees" in other_gpu.reason
    assert good.attached, good.reason
    assert trainer.lookup("ipc_bf16", torch.arange(10, device=CUDA)).is_cuda       # the server serves on


KILLED_TRAINER = textwrap.dedent("""
    import sys, torch
    from kvstore_client import KVStoreClient
    kv = KVStoreClient(sys.argv[1], same_host=True)
    rows = kv.lookup("ipc_bf16", torch.arange(64, device="cuda"))
    assert kv.same_host.device_pool(torch.device("cuda:0")) is not None, kv.same_host.device_reason
    print("attached", flush=True)
    sys.stdin.read()
""")


def test_a_trainer_killed_with_its_gpu_buffers_open_leaves_the_server_serving(server, trainer):
    child = subprocess.Popen([sys.executable, "-c", KILLED_TRAINER, server.address], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "attached"
    finally:
        child.kill()                                  # kill -9: no detach, its memory goes with it
        child.wait(60)
    ids = torch.arange(-200, 200, device=CUDA)
    assert torch.equal(trainer.lookup("ipc_bf16", ids), trainer.lookup("ipc_bf16", ids))
    assert server.alive()


def train_collection(client: KVStoreClient, table: str, device: str, pipeline: bool | str
                     ) -> tuple[list[float], object]:
    """20 steps of a collection (two features, one table) with a dense head; its losses.
    `pipeline="ahead"`: pipelined, each next batch named right after the forward; "in forward": by it."""
    from kvstore_client.collection import Feature, RemoteEmbeddingBagCollection

    collection = RemoteEmbeddingBagCollection(client, [Feature("a", table, "sum"), Feature("b", table, "mean")],
                                              pipeline=bool(pipeline))
    torch.manual_seed(0)
    head = torch.nn.Linear(2 * DIM, 1).to(device)
    dense = torch.optim.SGD(head.parameters(), lr=0.1)
    rng, losses = np.random.default_rng(1), []
    batches = [{name: torch.from_numpy(rng.integers(-IDS, IDS, (64, 3))).to(device) for name in ("a", "b")}
               for _ in range(20)]
    for step, batch in enumerate(batches):
        following = batches[step + 1] if step + 1 < len(batches) else None
        out = collection(batch, next_batch=following if pipeline == "in forward" else None)
        if pipeline == "ahead" and following is not None:
            collection.next_batch(batches[step + 1])
        loss = (head(torch.cat([out["a"], out["b"]], dim=1)) ** 2).mean()
        dense.zero_grad()
        loss.backward()
        dense.step()
        losses.append(loss.item())
    collection.flush()
    return losses, collection


@pytest.mark.parametrize("pipeline", [True, False, "ahead", "in forward"])
def test_the_collection_trains_a_gpu_table_through_cuda_ipc_as_a_host_table_over_the_network(trainer, remote,
                                                                                              pipeline):
    gpu, host = create_pair(trainer, f"ipc_coll_{pipeline}".replace(" ", "_"), "adagrad", "write_back")
    through_ipc, collection = train_collection(trainer, gpu, "cuda", pipeline)
    over_network, _ = train_collection(remote, host, "cuda", pipeline)
    assert collection._on_device == {(gpu, CUDA): True}          # gradients went up through a GPU buffer
    np.testing.assert_allclose(through_ipc, over_network, rtol=1e-4)
    ids = np.arange(-IDS, IDS)
    close(trainer.lookup(gpu, ids, on_miss="zeros"), remote.lookup(host, ids, on_miss="zeros"))


def test_remote_embedding_bag_on_cuda_trains_a_gpu_table_as_a_host_table(trainer, remote):
    from kvstore_client.torch_modules import RemoteEmbeddingBag

    gpu, host = create_pair(trainer, "ipc_bag", "rowwise_adagrad", "write_back")
    losses = {}
    for name, client, table in (("ipc", trainer, gpu), ("network", remote, host)):
        bag = RemoteEmbeddingBag(client, table, mode="sum")
        torch.manual_seed(0)
        head = torch.nn.Linear(DIM, 1).to(CUDA)
        rng, losses[name] = np.random.default_rng(7), []
        for _ in range(15):
            ids = torch.from_numpy(rng.integers(-IDS, IDS, (32, 4))).to(CUDA)
            out = bag(ids)
            assert out.is_cuda
            loss = (head(out) ** 2).mean()
            loss.backward()
            losses[name].append(loss.item())
    np.testing.assert_allclose(losses["ipc"], losses["network"], rtol=1e-4)
    ids = np.arange(-IDS, IDS)
    close(trainer.lookup(gpu, ids, on_miss="zeros"), remote.lookup(host, ids, on_miss="zeros"))


def test_a_buffer_freed_by_its_client_while_attached_leaves_the_server_serving(server, trainer):
    """A client that frees a buffer the server still has open (a bug, or hostile) and then names it
    in a lookup: the server's mapping keeps the memory until it closes it, so the call writes into
    pages nobody reads and the server's CUDA context stays sound."""
    buffer = DeviceBuffer(1 << 20, CUDA)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EmbeddingStoreStub(channel)
        assert attach(stub, buffer).attached
        buffer.close()                                  # freed without DetachSegment
        with trainer.same_host.pool.lease(1 << 20) as segment:
            ids = segment.put(np.arange(64, dtype=np.int64), "ids")
            answer = stub.SharedLookup(pb.SharedLookupRequest(
                table="ipc_bf16", segment=segment.name, ids=ids,
                weights=pb.SharedArray(dtype="bfloat16", shape=[64, DIM], offset=0, device_buffer=buffer.name)))
        assert answer.rows == 64
        stub.DetachSegment(pb.DetachSegmentRequest(segment=buffer.name))
    ids = torch.arange(-300, 300, device=CUDA)
    assert torch.equal(trainer.lookup("ipc_bf16", ids), trainer.lookup("ipc_bf16", ids))
    assert server.alive()
