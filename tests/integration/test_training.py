"""Training through the real server: gradients, optimizer state on the wire, prefetch locks."""
from __future__ import annotations

import multiprocessing
import subprocess
import sys

import grpc
import numpy as np
import pytest
from kvstore_client import FailedPreconditionError, InternalError, InvalidArgumentError, KVStoreClient
from kvstore_proto.tensors import encode_ids
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc

from .conftest import free_port, small_table, wait_until

DIM = 8


def test_apply_gradients_sums_duplicates_then_steps_once(client):
    small_table(client, "sgd_sum", DIM, optimizer={"name": "sgd", "lr": 0.5})
    before = client.lookup("sgd_sum", [1, 2])
    assert client.apply_gradients("sgd_sum", [1, 2, 1], np.ones((3, DIM), np.float32)) == 2
    after = client.lookup("sgd_sum", [1, 2], on_miss="error")
    np.testing.assert_allclose(after - before, [[-1.0] * DIM, [-0.5] * DIM], rtol=1e-6)


def test_optimizer_state_travels_with_lookup_and_update(client):
    small_table(client, "adam_state", DIM, optimizer={"name": "adam", "lr": 0.01})
    ids = np.arange(5)
    client.apply_gradients("adam_state", ids, np.ones((5, DIM), np.float32))
    weights, state = client.lookup("adam_state", ids, with_state=True)
    assert state.shape == (5, 2 * DIM) and state.dtype == np.float32
    np.testing.assert_allclose(state[:, :DIM], 0.1, rtol=1e-6)        # m = (1 - beta1) * g
    client.update("adam_state", [9], weights[:1], state=state[:1])
    w9, s9 = client.lookup("adam_state", [9], on_miss="error", with_state=True)
    np.testing.assert_array_equal(w9, weights[:1])
    np.testing.assert_array_equal(s9, state[:1])


def test_large_gradient_batch_streams_in_chunks(client):
    small_table(client, "big_grads", 128, optimizer={"name": "sgd", "lr": 1.0})
    ids = np.arange(20000)
    before = client.lookup("big_grads", ids)
    grads = np.random.default_rng(0).standard_normal((len(ids), 128)).astype(np.float32)   # 10 MiB
    assert client.apply_gradients("big_grads", ids, grads) == len(ids)
    np.testing.assert_allclose(client.lookup("big_grads", ids), before - grads, rtol=1e-5, atol=1e-6)


def test_wrong_gradient_width_is_invalid_argument_and_changes_nothing(client):
    small_table(client, "bad_grads", DIM)
    before = client.lookup("bad_grads", [1])
    with pytest.raises(InvalidArgumentError, match="grads"):
        client.apply_gradients("bad_grads", [1], np.ones((1, DIM + 1), np.float32))
    stub = pb_grpc.EmbeddingStoreStub(client._channel)
    from kvstore_proto.tensors import encode_tensor
    bad = pb.ApplyGradientsRequest(table="bad_grads", ids=encode_ids(np.array([1])),
                                   grads=encode_tensor(np.full((1, DIM), np.inf, np.float32)), last=True)
    with pytest.raises(grpc.RpcError) as raised:
        stub.ApplyGradients(iter([bad]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "grads" in raised.value.details()
    np.testing.assert_array_equal(client.lookup("bad_grads", [1], on_miss="error"), before)


def test_lock_without_a_session_is_refused(client):
    small_table(client, "no_session", DIM)
    stub = pb_grpc.EmbeddingStoreStub(client._channel)
    request = pb.PrefetchRequest(table="no_session", ids=encode_ids(np.array([1])), lock=True)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Prefetch(iter([request]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "owner" in raised.value.details()
    with pytest.raises(FailedPreconditionError, match="owner"):
        try:
            stub.Prefetch(iter([pb.PrefetchRequest(table="no_session", ids=encode_ids(np.array([1])), lock=True,
                                                   owner="not-a-session")]), timeout=10)
        except grpc.RpcError as error:
            from kvstore_client.errors import from_rpc_error
            raise from_rpc_error(error) from None


def test_locked_rows_survive_a_flood_and_are_released_by_apply_gradients(server):
    with KVStoreClient(server.address) as kv:
        kv.create_table("pinned", DIM, cache={"rows": 8, "ways": 8})     # one set of 8 ways
        assert kv.prefetch("pinned", np.arange(6), lock=True) == 6
        kv.lookup("pinned", np.arange(100, 200))                          # misses cannot evict pinned rows
        assert kv.stats("pinned")["cache_locked_rows"] == 6
        kv.apply_gradients("pinned", np.arange(4), np.zeros((4, DIM), np.float32), release=True)
        assert kv.stats("pinned")["cache_locked_rows"] == 2
        assert kv.release("pinned", [4, 5]) == 2
        assert kv.stats("pinned")["cache_locked_rows"] == 0


HOLD_LOCKS = """
import sys, time, numpy as np
from kvstore_client import KVStoreClient
kv = KVStoreClient(sys.argv[1])
kv.prefetch("orphaned", np.arange(5), lock=True)
print("locked", flush=True)
time.sleep(600)
"""


def test_locks_of_a_client_that_dies_are_released_when_its_lease_lapses(start_server):
    from .test_leases import expired_leases

    server = start_server("--lease-seconds", "0.5", metrics_port=free_port())
    with KVStoreClient(server.address) as client:
        small_table(client, "orphaned", DIM)
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCKS, server.address], stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            assert client.stats("orphaned")["cache_locked_rows"] == 5
        finally:
            holder.kill()
            holder.wait()
        assert wait_until(lambda: client.stats("orphaned")["cache_locked_rows"] == 0, timeout=60)
        assert expired_leases(server) >= 1


def _push(address: str, worker: int, rounds: int) -> None:
    rng = np.random.default_rng(worker)
    with KVStoreClient(address) as kv:
        for _ in range(rounds):
            ids = rng.integers(0, 50, 64)
            kv.apply_gradients("concurrent", ids, _grads(ids))


def _grads(ids: np.ndarray) -> np.ndarray:
    """A gradient that depends only on the id, so the sequential result is known exactly."""
    return (ids[:, None] % 7 + np.arange(DIM)[None, :] * 0.25).astype(np.float32)


def test_concurrent_gradients_from_four_processes_equal_the_sequential_result(server, client):
    small_table(client, "concurrent", DIM, optimizer={"name": "sgd", "lr": 0.001})
    ids = np.arange(50)
    initial = client.lookup("concurrent", ids)
    rounds = 20
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_push, args=(server.address, w, rounds)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    expected = initial.astype(np.float64)
    for worker in range(4):
        rng = np.random.default_rng(worker)
        for _ in range(rounds):
            pushed = rng.integers(0, 50, 64)
            np.subtract.at(expected, pushed, 0.001 * _grads(pushed).astype(np.float64))
    np.testing.assert_allclose(client.lookup("concurrent", ids, on_miss="error"), expected, rtol=1e-5, atol=1e-5)


# --- the training stream: ordered steps over many tables -------------------------------

def _stream(client):
    from kvstore_client.training_stream import TrainingStream

    return TrainingStream(client)


def test_two_trainers_interleaving_pipelined_steps_lose_no_update(server, client):
    """Each trainer sends 50 steps without waiting (gradients, then a lookup behind them); the
    steps of the two streams interleave on the server; every gradient lands."""
    import threading

    small_table(client, "two_trainers", DIM, optimizer={"name": "sgd", "lr": 1.0}, initializer={"kind": "zeros"})
    barrier = threading.Barrier(2)
    pushed, seen, errors = [[], []], [[], []], []

    def trainer(index: int) -> None:
        try:
            run(index)
        except Exception as exc:           # reported by the main thread
            errors.append(exc)
            barrier.abort()

    def run(index: int) -> None:
        rng = np.random.default_rng(index)
        with KVStoreClient(server.address, timeout=30.0) as own:
            stream = _stream(own)
            for _ in range(50):
                ids = rng.integers(0, 20, 40)                     # duplicates within and across trainers
                barrier.wait()
                pushed[index].append(ids)
                stream.send(gradients={"two_trainers": (ids, np.ones((40, DIM), np.float32))})
                seen[index].append(stream.send(lookups={"two_trainers": ids[:5]}))
            stream.flush()
            for step in seen[index]:
                assert step.result()[1]["two_trainers"].shape == (5, DIM)
            stream.close()

    threads = [threading.Thread(target=trainer, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    counts = np.bincount(np.concatenate(pushed[0] + pushed[1]), minlength=20)
    assert counts.sum() == 2 * 50 * 40
    np.testing.assert_array_equal(client.lookup("two_trainers", np.arange(20))[:, 0], -counts.astype(np.float32))


def test_a_step_sees_the_gradients_sent_before_it_on_its_stream(client):
    small_table(client, "stream_order", DIM, optimizer={"name": "sgd", "lr": 1.0}, initializer={"kind": "zeros"})
    stream = _stream(client)
    steps = [(stream.send(gradients={"stream_order": ([3, 3], np.ones((2, DIM), np.float32))}),
              stream.send(lookups={"stream_order": [3]})) for _ in range(10)]
    for k, (push, look) in enumerate(steps, start=1):
        assert push.result()[0] == {"stream_order": 1}
        np.testing.assert_array_equal(look.result()[1]["stream_order"], [[-2.0 * k] * DIM])
    stream.close()


def test_a_step_larger_than_a_message_travels_in_pieces(server):
    with KVStoreClient(server.address, chunk_bytes=4096) as small_chunks:
        small_table(small_chunks, "stream_big", DIM, optimizer={"name": "sgd", "lr": 1.0},
                    cache={"rows": 4096, "ways": 8})
        ids = np.arange(3000)
        before = small_chunks.lookup("stream_big", ids)
        grads = np.random.default_rng(0).standard_normal((3000, DIM)).astype(np.float32)
        stream = _stream(small_chunks)
        stepped, rows = stream.send(gradients={"stream_big": (ids, grads)}, lookups={"stream_big": ids}).result()
        assert stepped == {"stream_big": 3000}
        np.testing.assert_array_equal(rows["stream_big"], before - grads)
        stream.close()


def test_a_bad_table_anywhere_in_a_step_changes_no_table(client):
    from kvstore_client import NotFoundError

    small_table(client, "stream_good", DIM)
    small_table(client, "stream_strict", DIM)
    before = client.lookup("stream_good", [1, 2])
    stream = _stream(client)
    good = ([1, 2], np.ones((2, DIM), np.float32))
    with pytest.raises(NotFoundError, match="no_such_table"):
        stream.send(gradients={"stream_good": good, "no_such_table": good}).result()
    nan = np.ones((2, DIM), np.float32)
    nan[1, 1] = np.nan
    with pytest.raises(InvalidArgumentError, match="stream_strict"):
        stream.send(gradients={"stream_good": good, "stream_strict": ([1, 2], nan)}).result()
    with pytest.raises(InvalidArgumentError, match="values"):
        stream.send(gradients={"stream_good": good, "stream_strict": ([1, 2], np.ones((2, DIM + 1)))}).result()
    np.testing.assert_array_equal(client.lookup("stream_good", [1, 2]), before)
    stream.send(gradients={"stream_good": good}).result()             # the stream reopens after an error
    assert not np.array_equal(client.lookup("stream_good", [1, 2]), before)
    stream.close()


def test_a_large_step_over_two_tables_equals_its_tables_stepped_alone_and_is_refused_whole(client):
    """A step of 2 x 12,000 gradient rows and their lookups: each table ends as if stepped alone,
    each lookup sees its table's gradients; NaN in the first table's gradients changes neither."""
    n = 12_000
    for name in ("wide_a", "wide_b", "alone_a", "alone_b"):
        small_table(client, name, DIM, optimizer={"name": "adagrad", "lr": 0.1}, cache={"rows": 1 << 15})
    rng = np.random.default_rng(3)
    ids = {"a": rng.integers(0, 20_000, n), "b": rng.integers(0, 20_000, n)}       # duplicates included
    grads = {key: rng.standard_normal((n, DIM)).astype(np.float32) for key in ids}
    stream = _stream(client)
    nan = grads["a"].copy()
    nan[n // 2, 3] = np.nan
    with pytest.raises(InvalidArgumentError, match="wide_a"):
        stream.send(gradients={"wide_a": (ids["a"], nan), "wide_b": (ids["b"], grads["b"])},
                    lookups={"wide_a": ids["a"][:5], "wide_b": ids["b"][:5]}).result()
    for key in ("a", "b"):        # refused whole: neither table has rows yet (a lookup with init creates none)
        assert client.stats(f"wide_{key}").get("cache_rows", 0) == 0
    stepped, rows = stream.send(gradients={"wide_a": (ids["a"], grads["a"]), "wide_b": (ids["b"], grads["b"])},
                                lookups={"wide_b": ids["b"], "wide_a": ids["a"]}).result()
    assert stepped == {"wide_a": len(np.unique(ids["a"])), "wide_b": len(np.unique(ids["b"]))}
    for key in ("a", "b"):
        stream.send(gradients={f"alone_{key}": (ids[key], grads[key])}).result()
        alone = client.lookup(f"alone_{key}", ids[key])
        np.testing.assert_array_equal(rows[f"wide_{key}"], alone)
        np.testing.assert_array_equal(client.lookup(f"wide_{key}", ids[key]), alone)
    stream.close()


def test_train_refuses_on_miss_error(client):
    small_table(client, "stream_miss", DIM)
    stream = _stream(client)
    with pytest.raises(InvalidArgumentError, match="on_miss"):
        stream.send(lookups={"stream_miss": [1]}, on_miss="error")
    request = pb.TrainRequest(lookups=[pb.TableRows(table="stream_miss", ids=encode_ids(np.array([1])))],
                              on_miss=pb.ON_MISS_ERROR)
    stub = pb_grpc.EmbeddingStoreStub(client._channel)
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Train(iter([request]), timeout=10))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "on_miss" in raised.value.details()


def test_prefetched_rows_are_cached_when_a_later_step_reads_them(client):
    small_table(client, "stream_warm", DIM, cache={"rows": 1024, "ways": 8})
    stream = _stream(client)
    stream.send(prefetches={"stream_warm": np.arange(100, 150)})
    misses = client.stats("stream_warm").get("cache_misses", 0)
    _, rows = stream.send(lookups={"stream_warm": np.arange(100, 150)}).result()
    assert client.stats("stream_warm").get("cache_misses", 0) == misses
    np.testing.assert_array_equal(rows["stream_warm"], client.lookup("stream_warm", np.arange(100, 150)))
    stream.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_steps_rows_are_the_tables_whether_the_answer_is_one_message_or_several(client, dtype):
    """A step's looked-up rows are gathered straight into its answer when they fit in one message
    (4 MiB), and sent in several messages when they do not: either way, the tables' rows."""
    tables = [f"answer_{dtype}_{k}" for k in range(2)]
    for table in tables:
        small_table(client, table, 64, dtype=dtype, optimizer={"name": "sgd", "lr": 0.5}, cache={"rows": 1 << 16})
    rng = np.random.default_rng(5)
    stream = _stream(client)
    for n in (700, 40_000):             # 2 x 700 rows: one message; 2 x 40,000 (more than 4 MiB): several
        ids = {table: rng.integers(0, 50_000, n) for table in tables}
        grads = {table: rng.standard_normal((n, 64)).astype(np.float32) for table in tables}
        stream.send(gradients={table: (ids[table], grads[table]) for table in tables}).result()
        _, rows = stream.send(lookups={tables[1]: ids[tables[1]], tables[0]: ids[tables[0]][::-1]}).result()
        assert list(rows) == [tables[1], tables[0]]
        np.testing.assert_array_equal(rows[tables[1]], client.lookup(tables[1], ids[tables[1]]))
        np.testing.assert_array_equal(rows[tables[0]], client.lookup(tables[0], ids[tables[0]][::-1]))
    stream.close()


def _train_calls(server, code: str) -> float:
    from .test_service import scrape

    line = f'kvstore_rpc_duration_seconds_count{{code="{code}",method="Train"}} '
    return sum(float(row[len(line):]) for row in scrape(server).splitlines() if row.startswith(line))


def test_a_stream_closed_with_every_step_answered_ends_as_a_finished_call(server, client):
    """Closing a stream whose steps are all answered ends the call (OK in the server's metrics and
    log), so a trainer's normal end is not counted as a cancelled call, even while the server
    still warms the rows of a prefetch it has answered; a stream closed with a step unanswered
    is cancelled."""
    small_table(client, "stream_end", DIM)
    ok, cancelled = _train_calls(server, "OK"), _train_calls(server, "CANCELLED")
    stream = _stream(client)
    stream.send(lookups={"stream_end": [1, 2]}).result()
    stream.send(prefetches={"stream_end": np.arange(100, 200_100)}).result()   # answered; warmed after
    stream.close()
    assert (_train_calls(server, "OK"), _train_calls(server, "CANCELLED")) == (ok + 1, cancelled)
    stream = _stream(client)
    step = stream.send(lookups={"stream_end": [3]})
    stream.close()
    with pytest.raises(InternalError, match="closed before"):
        step.result()
