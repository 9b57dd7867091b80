"""The same-host path through a real server on loopback: results equal the network path's, it falls
back where it cannot be had, and hostile segment requests are refused without harm."""
from __future__ import annotations

import gc
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from kvstore_client import (
    FailedPreconditionError,
    InvalidArgumentError,
    KVStoreClient,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from .conftest import random_rows, small_table

SEGMENT = re.compile(r"/dev/shm/(kvstore-[0-9a-f]{32})")

DIM = 8
IDS = np.array([5, 1, 5, 9, -3, 1, 1, 2**40, 7, 5], dtype=np.int64)     # duplicates on purpose


@pytest.fixture(scope="module")
def shm(server):
    with KVStoreClient(server.address, same_host=True) as opened:
        yield opened


@pytest.fixture(scope="module")
def net(server):
    with KVStoreClient(server.address, same_host=False) as opened:
        yield opened


def test_a_loopback_client_uses_shared_memory_and_a_forced_off_one_does_not(shm, net, server):
    assert shm.same_host.usable() and shm.same_host.active
    assert not net.same_host.usable()
    with KVStoreClient(server.address, same_host="auto") as auto, KVStoreClient(server.address) as default:
        assert auto.same_host.usable() and not default.same_host.usable()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_lookups_equal_the_network_path_duplicates_and_every_miss_mode(shm, net, dtype):
    small_table(shm, f"look_{dtype}", DIM, dtype=dtype)
    for on_miss in ("zeros", "init", "init_insert"):
        via_shm = shm.lookup(f"look_{dtype}", IDS, on_miss=on_miss)
        via_net = net.lookup(f"look_{dtype}", IDS, on_miss=on_miss)
        assert via_shm.dtype == via_net.dtype
        assert np.array_equal(via_shm.view(np.uint8), via_net.view(np.uint8))


def test_lookup_into_a_callers_buffer_and_of_no_ids(shm, net):
    small_table(shm, "look_out", DIM)
    out = np.empty((len(IDS), DIM), np.float32)
    shm.lookup("look_out", IDS, out=out)
    assert np.array_equal(out, net.lookup("look_out", IDS))
    assert shm.lookup("look_out", np.zeros(0, np.int64)).shape == (0, DIM)


def test_lookup_of_missing_ids_with_error_mode_is_not_found_and_the_next_call_works(shm):
    small_table(shm, "look_err", DIM)
    with pytest.raises(NotFoundError):
        shm.lookup("look_err", [404], on_miss="error")
    assert shm.lookup("look_err", IDS).shape == (len(IDS), DIM)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad", "adam", "partial_rowwise_adam"])
def test_gradient_steps_equal_the_network_path(shm, net, optimizer):
    for client, name in ((shm, f"grad_shm_{optimizer}"), (net, f"grad_net_{optimizer}")):
        small_table(client, name, DIM, optimizer={"name": optimizer, "lr": 0.05})
    rng = np.random.default_rng(3)
    for _ in range(5):
        grads = rng.standard_normal((len(IDS), DIM)).astype(np.float32)
        assert shm.apply_gradients(f"grad_shm_{optimizer}", IDS, grads) == \
            net.apply_gradients(f"grad_net_{optimizer}", IDS, grads)
    weights_shm, state_shm = net.lookup(f"grad_shm_{optimizer}", IDS, with_state=True)
    weights_net, state_net = net.lookup(f"grad_net_{optimizer}", IDS, with_state=True)
    assert np.array_equal(weights_shm, weights_net) and np.array_equal(state_shm, state_net)
    assert np.array_equal(shm.lookup(f"grad_shm_{optimizer}", IDS), weights_net)


def test_updates_equal_the_network_path_last_write_wins_state_and_scores(shm, net):
    for client, name in ((shm, "upd_shm"), (net, "upd_net")):
        small_table(client, name, DIM, optimizer={"name": "adagrad", "lr": 0.1})
        weights = random_rows(len(IDS), DIM, seed=4)
        state = random_rows(len(IDS), DIM, seed=5)
        client.update(name, IDS, weights, state=state, scores=np.arange(len(IDS), dtype=np.float32))
        client.update(name, IDS[:3], random_rows(3, DIM, "float16", seed=6))          # widened to float32
    for with_state in (False, True):
        left, right = net.lookup("upd_shm", IDS, with_state=with_state), net.lookup("upd_net", IDS,
                                                                                    with_state=with_state)
        assert all(np.array_equal(a, b) for a, b in zip(left, right, strict=True))


def test_nonfinite_gradients_are_invalid_argument_and_change_nothing(shm):
    small_table(shm, "nan_grads", DIM)
    before = shm.lookup("nan_grads", IDS)
    grads = np.ones((len(IDS), DIM), np.float32)
    grads[3, 2] = np.nan
    with pytest.raises(InvalidArgumentError, match="NaN"):
        shm.apply_gradients("nan_grads", IDS, grads)
    assert np.array_equal(shm.lookup("nan_grads", IDS), before)


def test_sharded_client_over_shared_memory_equals_the_network_path(start_server):
    servers = [start_server() for _ in range(2)]
    addresses = [s.address for s in servers]
    with KVStoreClient(addresses, same_host=True) as shm, KVStoreClient(addresses, same_host=False) as net:
        assert all(shard.same_host.usable() for shard in shm.shards)
        shm.create_table("sharded", DIM, optimizer={"name": "rowwise_adagrad", "lr": 0.1})
        net.create_table("sharded_net", DIM, optimizer={"name": "rowwise_adagrad", "lr": 0.1})
        grads = random_rows(len(IDS), DIM, seed=7)
        assert shm.apply_gradients("sharded", IDS, grads) == net.apply_gradients("sharded_net", IDS, grads)
        assert np.array_equal(shm.lookup("sharded", IDS), net.lookup("sharded_net", IDS))


def test_concurrent_calls_of_one_client_use_separate_segments(shm, net):
    small_table(shm, "concurrent_shm", DIM)
    id_sets = [np.arange(i * 100, i * 100 + 50) for i in range(4)]
    expected = [net.lookup("concurrent_shm", ids) for ids in id_sets]
    barrier = threading.Barrier(len(id_sets))
    results: dict[int, list[bool]] = {}

    def worker(index: int) -> None:
        barrier.wait()
        results[index] = [np.array_equal(shm.lookup("concurrent_shm", id_sets[index]), expected[index])
                          for _ in range(20)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(id_sets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(all(done) for done in results.values()) and len(results) == len(id_sets)


def test_a_call_that_failed_retires_its_segment(shm):
    small_table(shm, "retire", DIM)
    shm.lookup("retire", IDS)                # its rows were lent: its segment comes back as they go
    pool = shm.same_host.pool
    with pool._lock:
        pool._collect_returned()             # (the next call would collect it; count it free now)
    before = {s.name for s in pool._free}
    with pytest.raises(NotFoundError):
        shm.lookup("retire", [404, 405], on_miss="error")
    gone = before - {s.name for s in pool._free}
    assert gone and not any(os.path.exists(f"/dev/shm/{name}") for name in gone)
    assert shm.lookup("retire", IDS).shape == (len(IDS), DIM)


def test_close_unlinks_the_clients_segments_and_a_result_still_held_keeps_its_rows(server):
    before = mapped_segments()
    client = KVStoreClient(server.address, same_host=True)
    small_table(client, "closing", DIM)
    client.update("closing", IDS, random_rows(len(IDS), DIM, seed=4))
    held = client.lookup("closing", IDS)                     # over a segment lent to it
    expected = held.copy()
    names = mapped_segments() - before
    assert names and metric(server, "kvstore_same_host_segments") >= len(names)     # mapped by the server
    assert metric(server, "kvstore_same_host_gpu_buffers") == 0                       # no CUDA tensors here
    client.close()
    assert np.array_equal(held, expected)                    # the held result is intact after close
    del held
    gc.collect()
    assert not any(os.path.exists(f"/dev/shm/{name}") for name in names)


@pytest.mark.parametrize("ending", ["closed, result held", "closed, result dropped", "never closed"])
def test_a_process_ends_quietly_and_leaves_no_segment(server, shm, ending):
    """A result lent over a segment outlives its client's close, and a client may never be closed
    at all: either way the process ends without a word on stderr (Python's SharedMemory complains
    of live exports, its resource tracker of segments left linked) and leaves nothing in /dev/shm."""
    table = "exit_" + re.sub(r"\W+", "_", ending)
    small_table(shm, table, DIM)
    shm.update(table, IDS, random_rows(len(IDS), DIM, seed=7))
    script = "\n".join([
        "import gc, re, numpy as np",
        "from kvstore_client import KVStoreClient",
        f"client = KVStoreClient({server.address!r}, same_host=True)",
        f"held = client.lookup({table!r}, {IDS.tolist()!r})",
        "copy = held.copy()",
        f"print(' '.join(set(re.findall({SEGMENT.pattern!r}, open('/proc/self/maps').read()))))",
        *(["client.close()"] if ending.startswith("closed") else []),
        "assert np.array_equal(held, copy)",
        *(["del held", "gc.collect()"] if ending == "closed, result dropped" else []),
    ])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    names = done.stdout.split()
    assert names and not any(os.path.exists(f"/dev/shm/{name}") for name in names)


def test_a_forked_child_ending_leaves_its_parents_segments_linked(server, shm):
    """A process forked from a client's (a data loader's worker) that ends normally must not
    unlink the segments its parent still uses."""
    small_table(shm, "forked", DIM)
    shm.update("forked", IDS, random_rows(len(IDS), DIM, seed=8))
    script = "\n".join([
        "import os, re, sys, numpy as np",
        "from kvstore_client import KVStoreClient",
        f"client = KVStoreClient({server.address!r}, same_host=True)",
        f"first = client.lookup('forked', {IDS.tolist()!r}).copy()",
        f"names = set(re.findall({SEGMENT.pattern!r}, open('/proc/self/maps').read()))",
        "child = os.fork()",
        "if child == 0:",
        "    sys.exit(0)",                                     # the child's exit runs its atexit hooks
        "os.waitpid(child, 0)",
        "print(len(names), all(os.path.exists(f'/dev/shm/{name}') for name in names))",
        f"print(np.array_equal(client.lookup('forked', {IDS.tolist()!r}), first), client.same_host.active)",
        "client.close()",
    ])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (count, linked), (same, active) = (line.split() for line in done.stdout.splitlines()[-2:])
    assert int(count) >= 1 and linked == "True" and same == "True" and active == "True", done.stdout


def mapped_segments() -> set[str]:
    """The kvstore segments this process has mapped: its clients' (a test worker running beside
    this one has segments in /dev/shm too)."""
    with open("/proc/self/maps") as maps:
        return set(SEGMENT.findall(maps.read()))


def metric(server, name: str, **labels: str) -> float:
    """The server's sample `name` (with these label values, where given) from its metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        for family in text_string_to_metric_families(response.read().decode()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
    raise AssertionError(f"{name} {labels or ''} is not exposed")


def test_a_server_with_the_path_off_gets_the_network_path(start_server):
    off = start_server("--same-host", "false")
    with KVStoreClient(off.address, same_host="auto") as auto, KVStoreClient(off.address) as net:
        small_table(auto, "fallback", DIM, optimizer={"name": "sgd", "lr": 1.0})
        auto.apply_gradients("fallback", IDS, np.ones((len(IDS), DIM), np.float32))
        assert not auto.same_host.active and "off" in auto.same_host.reason
        assert np.array_equal(auto.lookup("fallback", IDS), net.lookup("fallback", IDS))
    with KVStoreClient(off.address, same_host=True) as forced, pytest.raises(FailedPreconditionError):
        forced.lookup("fallback", IDS)


def test_the_token_still_guards_the_header_calls(start_server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-of-32-characters-xx\n")
    token_file.chmod(0o600)
    guarded = start_server("--auth-token-file", str(token_file))
    with KVStoreClient(guarded.address, same_host=True) as anonymous, pytest.raises(UnauthenticatedError):
        anonymous.lookup("any", IDS)
    with KVStoreClient(guarded.address, token="s3cret-token-of-32-characters-xx", same_host=True) as allowed:
        small_table(allowed, "guarded", DIM)
        assert allowed.lookup("guarded", IDS).shape == (len(IDS), DIM) and allowed.same_host.active


def test_auto_takes_the_network_path_for_an_address_that_is_not_loopback():
    with KVStoreClient("192.0.2.1:1", same_host="auto") as remote:       # never dialled: decided by the address
        assert not remote.same_host.usable() and "loopback" in remote.same_host.reason


def test_an_unknown_same_host_mode_is_invalid_argument(server):
    with pytest.raises(InvalidArgumentError, match="same_host"):
        KVStoreClient(server.address, same_host="yes")


def _external_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))              # no packet is sent: picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_a_peer_that_is_not_on_loopback_is_refused_the_shared_calls(start_server, shm):
    address = _external_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    exposed = start_server("--host", "0.0.0.0")
    port = exposed.address.rsplit(":", 1)[1]
    with grpc.insecure_channel(f"{address}:{port}") as channel:
        stub = pb_grpc.EmbeddingStoreStub(channel)
        answer = stub.AttachSegment(pb.AttachSegmentRequest(segment="kvstore-" + "1" * 32, token=b"t" * 16))
        assert not answer.attached and "not on the server's machine" in answer.reason
        with pytest.raises(grpc.RpcError) as caught:
            stub.SharedLookup(pb.SharedLookupRequest(table="t", segment="kvstore-" + "1" * 32))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert caught.value.details().startswith("segment")


def test_a_lookup_of_several_pieces_in_flight_equals_the_network_path(shm, net):
    """Rows copied into a caller's buffer come in pieces, two in flight; rows lent over the segment
    come in one call."""
    small_table(shm, "pieces", 128)
    ids = np.random.default_rng(8).integers(-10**6, 10**6, 40_000)       # 20 MiB of rows, duplicates too
    for on_miss in ("init", "init_insert"):
        out = np.empty((len(ids), 128), np.float32)
        shm.lookup("pieces", ids, on_miss=on_miss, out=out)               # two 16 MiB pieces
        want = net.lookup("pieces", ids, on_miss=on_miss)
        assert np.array_equal(out, want) and np.array_equal(shm.lookup("pieces", ids, on_miss=on_miss), want)


def test_copies_of_shared_inputs_count_against_the_request_memory_budget(start_server):
    tight = start_server("--max-buffered-bytes", str(1 << 16))
    with KVStoreClient(tight.address, same_host=True) as shm:
        small_table(shm, "budget", 128, optimizer={"name": "sgd", "lr": 1.0})
        ids = np.arange(1000)
        before = shm.lookup("budget", ids)
        with pytest.raises(ResourceExhaustedError, match="max_buffered_bytes"):
            shm.apply_gradients("budget", ids, np.ones((1000, 128), np.float32))
        with pytest.raises(ResourceExhaustedError, match="max_buffered_bytes"):
            shm.update("budget", ids, np.ones((1000, 128), np.float32))
        assert np.array_equal(shm.lookup("budget", ids), before)


def test_without_a_gpu_cuda_ipc_is_refused_with_the_reason_and_the_segment_path_stays(shm):
    """No CUDA driver here (CI): asking for GPU buffers answers None with the reason, and the
    client's calls keep working through its segments."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: tests/gpu/test_cuda_ipc.py covers CUDA IPC")
    assert shm.same_host.device_pool(torch.device("cuda:0")) is None
    assert "CUDA" in shm.same_host.device_reason
    small_table(shm, "no_gpu", DIM)
    assert shm.lookup("no_gpu", torch.from_numpy(IDS)).shape == (len(IDS), DIM)


def test_a_lookup_result_owns_its_segment_until_it_and_its_views_are_gone(shm, net):
    """Lookups return rows over the segment the server wrote (no copy): a view or tensor kept from
    a result keeps its rows through later lookups, and results let go are recycled, not piled up."""
    small_table(net, "lent", DIM)
    first_ids, other_ids = np.arange(0, 64), np.arange(1000, 1064)
    net.update("lent", first_ids, random_rows(64, DIM, seed=5))
    net.update("lent", other_ids, random_rows(64, DIM, seed=6))
    result = shm.lookup("lent", first_ids)
    view = result[3:9]
    kept = view.copy()
    del result
    before = mapped_segments()
    for _ in range(50):                          # results dropped at once: their segments come back
        assert np.array_equal(shm.lookup("lent", other_ids), net.lookup("lent", other_ids))
    assert np.array_equal(view, kept)            # the view's segment was not reused meanwhile
    made = mapped_segments() - before
    assert len(made) <= 2, made
    torch = pytest.importorskip("torch")
    tensor = torch.from_numpy(shm.lookup("lent", first_ids))
    for _ in range(5):
        shm.lookup("lent", other_ids)
    assert np.array_equal(tensor.numpy(), net.lookup("lent", first_ids))


def test_a_caller_keeping_every_result_gets_copies_past_a_few_lent_segments(shm, net):
    """Each lent result holds a segment (a file descriptor and a mapping): past MAX_LENT results
    alive, lookups return copies, so a caller keeping all of them never runs out of descriptors."""
    from kvstore_client.shared_memory import MAX_LENT

    small_table(net, "kept_all", DIM)
    before = mapped_segments()
    kept = [(ids, shm.lookup("kept_all", ids)) for ids in (np.arange(i, i + 40) for i in range(0, 4000, 40))]
    made = mapped_segments() - before
    assert len(made) <= MAX_LENT + 2, len(made)
    for ids, rows in kept:
        assert np.array_equal(rows, net.lookup("kept_all", ids))
