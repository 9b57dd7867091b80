"""Replication and delta checkpoints against real server processes: a primary, replicas following it
(`--replica-of`), kill -9 and restarts, the change feed's window, and export/import chains."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from kvstore_client import FailedPreconditionError, KVStoreClient
from ops.conftest import scrape, value

from .conftest import TwoThenHold, free_port, small_table, wait_until

DEADLINE = 120.0          # generous: the machine is shared; every wait ends as soon as its condition holds


def rows_of(client: KVStoreClient, table: str) -> dict[int, bytes]:
    """Every row's weights and optimizer state, by id (a full export)."""
    full = client.export_table(table)
    return {int(i): w.tobytes() + s.tobytes() for i, w, s in zip(full.ids, full.weights, full.state, strict=True)}


def same_rows(primary: KVStoreClient, replica: KVStoreClient, table: str) -> bool:
    try:
        return rows_of(replica, table) == rows_of(primary, table)
    except Exception:         # the replica has not created the table yet
        return False


def converges(primary_client: KVStoreClient, replica, table: str) -> bool:
    """The replica's rows of `table` equal the primary's within the deadline."""
    with KVStoreClient(replica.address, timeout=60.0) as replica_client:
        return wait_until(lambda: same_rows(primary_client, replica_client, table), DEADLINE)


def start_replica(start_server, primary, *args: str, data_dir=None):
    return start_server("--replica-of", primary.address, "--replication-checkpoint-seconds", "0.2", *args,
                        data_dir=data_dir, metrics_port=free_port())


def kill9(replica) -> None:
    """kill -9 once the replica has bootstrapped (and so saved a position)."""
    assert wait_until(lambda: replica_value(replica, "kvstore_replica_bootstrapped") == 1, DEADLINE)
    replica.process.kill()
    replica.process.wait()
    replica.process.stdout.close()


def replica_value(replica, name: str, **labels: str) -> float:
    """A replica's own metric (labelled with the primary it follows)."""
    return value(scrape(replica), name, primary=replica.args[1], **labels)


def bootstraps(replica, reason: str) -> float:
    return replica_value(replica, "kvstore_replica_bootstraps_total", reason=reason)


def caught_up(replica, primary) -> bool:
    return replica_value(replica, "kvstore_replica_applied_sequence") == value(scrape(primary),
                                                                               "kvstore_changefeed_sequence")


@pytest.fixture(scope="module")
def primary(start_server):
    return start_server("--port", str(free_port()), metrics_port=free_port())


@pytest.fixture(scope="module")
def primary_client(primary):
    with KVStoreClient(primary.address, timeout=60.0) as opened:
        yield opened


def gradient_writers(address: str, table: str, stop: threading.Event, count: int = 2) -> list[threading.Thread]:
    """Threads stepping Zipf-distributed ids until `stop` is set."""

    def write(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with KVStoreClient(address, timeout=60.0) as writer:
            while not stop.is_set():
                ids = np.minimum(rng.zipf(1.3, 256), 5000) - 1
                writer.apply_gradients(table, ids, rng.standard_normal((256, 8)).astype(np.float32))

    threads = [threading.Thread(target=write, args=(seed,)) for seed in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_replica_equals_the_primary_after_continuous_gradient_writers_stop(start_server, primary, primary_client):
    small_table(primary_client, "live", optimizer={"name": "adagrad"})
    primary_client.apply_gradients("live", np.arange(100), np.ones((100, 8), np.float32))
    stop = threading.Event()
    writers = gradient_writers(primary.address, "live", stop)
    try:
        replica = start_replica(start_server, primary)
        with KVStoreClient(replica.address, timeout=60.0) as replica_client:
            assert wait_until(lambda: replica_value(replica, "kvstore_replica_rows_applied_total") > 1000, DEADLINE)
            assert value(scrape(primary), "kvstore_subscribers") == 1
            stop.set()
            for thread in writers:
                thread.join()
            assert wait_until(lambda: same_rows(primary_client, replica_client, "live"), DEADLINE)
            assert wait_until(lambda: caught_up(replica, primary), DEADLINE)
            assert bootstraps(replica, "initial") == 1 and replica_client.health() == "SERVING"
            with pytest.raises(FailedPreconditionError, match=primary.address):
                replica_client.apply_gradients("live", [1], np.ones((1, 8), np.float32))
            unseen = replica_client.lookup("live", [987654])              # init_insert acts as init: not stored
            assert (unseen == primary_client.lookup("live", [987654], on_miss="init")).all()
            assert same_rows(primary_client, replica_client, "live")      # nothing the replica refused changed it
    finally:
        stop.set()
        for thread in writers:
            thread.join()


def test_replica_killed_inside_the_window_resumes_without_bootstrap(start_server, primary, primary_client):
    small_table(primary_client, "resume")
    primary_client.update("resume", np.arange(50), np.ones((50, 8), np.float32))
    replica = start_replica(start_server, primary)
    assert converges(primary_client, replica, "resume")
    primary_client.update("resume", np.arange(25, 75), np.full((50, 8), 2.0, np.float32))
    kill9(replica)
    replica = start_replica(start_server, primary, data_dir=replica.data_dir)
    primary_client.delete("resume", [0, 1])
    assert converges(primary_client, replica, "resume")
    assert bootstraps(replica, "initial") == 0 and bootstraps(replica, "window") == 0


def test_replica_outside_the_window_rebootstraps_and_catches_up(start_server):
    small_primary = start_server("--replication-window-rows", "64", metrics_port=free_port())
    with KVStoreClient(small_primary.address, timeout=60.0) as primary_client:
        small_table(primary_client, "far")
        primary_client.update("far", np.arange(10), np.ones((10, 8), np.float32))
        replica = start_replica(start_server, small_primary)
        assert converges(primary_client, replica, "far")
        kill9(replica)
        for start in range(0, 1000, 50):                    # far more ids than the window holds
            primary_client.update("far", np.arange(start, start + 50), np.full((50, 8), start, np.float32))
        replica = start_replica(start_server, small_primary, data_dir=replica.data_dir)
        assert converges(primary_client, replica, "far")
        assert wait_until(lambda: bootstraps(replica, "window") == 1, DEADLINE)
        assert value(scrape(small_primary), "kvstore_subscribers_dropped_total") >= 1


def test_deletes_evictions_and_drops_reach_the_replica(start_server, primary, primary_client):
    small_table(primary_client, "gone", eviction={"min_norm": 0.5})
    weights = np.ones((20, 8), np.float32)
    weights[10:] = 0.0                                       # rows 10..19 fall under the norm threshold
    primary_client.update("gone", np.arange(20), weights)
    replica = start_replica(start_server, primary)
    with KVStoreClient(replica.address, timeout=60.0) as replica_client:
        assert wait_until(lambda: same_rows(primary_client, replica_client, "gone"), DEADLINE)
        assert primary_client.evict("gone")["norm"] == 10
        primary_client.delete("gone", [0, 1, 2])
        assert wait_until(lambda: sorted(rows_of(replica_client, "gone")) == list(range(3, 10)), DEADLINE)
        assert replica_value(replica, "kvstore_replica_tombstones_applied_total") >= 13
        primary_client.drop_table("gone")
        assert wait_until(lambda: "gone" not in replica_client.list_tables(), DEADLINE)


def test_a_merge_import_on_the_primary_reaches_the_replica_without_a_rebootstrap(start_server, primary,
                                                                                   primary_client):
    small_table(primary_client, "merged")
    primary_client.update("merged", np.arange(0, 3000), np.ones((3000, 8), np.float32))
    replica = start_replica(start_server, primary)
    assert converges(primary_client, replica, "merged")
    rng = np.random.default_rng(5)
    ids = rng.choice(20000, 5000, replace=False)               # over the old rows and beyond them
    primary_client.import_table("merged", ids, rng.standard_normal((5000, 8)).astype(np.float32), mode="merge")
    assert converges(primary_client, replica, "merged")
    assert bootstraps(replica, "initial") == 1 and bootstraps(replica, "window") == 0


def test_replica_follows_across_a_primary_restart(start_server, primary, primary_client):
    small_table(primary_client, "restart")
    primary_client.update("restart", np.arange(30), np.ones((30, 8), np.float32))
    replica = start_replica(start_server, primary)
    with KVStoreClient(replica.address, timeout=60.0) as replica_client:
        assert wait_until(lambda: same_rows(primary_client, replica_client, "restart"), DEADLINE)
        assert wait_until(lambda: caught_up(replica, primary), DEADLINE)   # resumable: it has the last sequence
        primary.restart()                                    # same data directory and port
        with KVStoreClient(primary.address, timeout=60.0) as again:
            again.update("restart", np.arange(10), np.full((10, 8), 3.0, np.float32))
            assert wait_until(lambda: same_rows(again, replica_client, "restart"), DEADLINE)
    assert bootstraps(replica, "window") == 0 and bootstraps(replica, "error") == 0


def test_subscriber_outside_the_window_gets_failed_precondition_with_the_oldest_sequence(start_server):
    server = start_server("--replication-window-rows", "16", metrics_port=free_port())
    with KVStoreClient(server.address, timeout=60.0) as client:
        small_table(client, "w")
        for start in range(0, 100, 10):
            client.update("w", np.arange(start, start + 10), np.zeros((10, 8), np.float32))
        oldest = int(value(scrape(server), "kvstore_changefeed_oldest_sequence"))
        assert oldest > 1
        with pytest.raises(FailedPreconditionError, match=f"oldest available sequence is {oldest}"):
            next(client.subscribe(from_sequence=1))
        first = next(client.subscribe(from_sequence=oldest))
        assert first.batch_end and first.sequence == oldest
        with pytest.raises(FailedPreconditionError, match="since_sequence"):
            client.export_sequenced("w", since_sequence=1)


def kvstore(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvstore_client", "--address", server.address, "--quiet", *args],
                          capture_output=True, text=True, timeout=300)


def test_a_full_export_and_three_deltas_rebuild_the_primary_in_an_empty_server(start_server, primary,
                                                                                  primary_client, tmp_path):
    rng = np.random.default_rng(1)
    small_table(primary_client, "chain", optimizer={"name": "adam"})
    primary_client.apply_gradients("chain", np.arange(500), rng.standard_normal((500, 8)).astype(np.float32))
    assert kvstore(primary, "export", "chain", str(tmp_path / "full")).returncode == 0
    since = json.loads((tmp_path / "full" / "manifest.json").read_text())["sequence"]
    for n in range(3):
        primary_client.apply_gradients("chain", rng.integers(0, 700, 64), rng.standard_normal((64, 8)).astype("f4"))
        primary_client.delete("chain", [n * 11])
        done = kvstore(primary, "export", "chain", str(tmp_path / f"delta{n}"), "--since", str(since))
        assert done.returncode == 0, done.stderr
        manifest = json.loads((tmp_path / f"delta{n}" / "manifest.json").read_text())
        assert manifest["since_sequence"] == since and manifest["tombstones"]["rows"] >= 1
        since = manifest["sequence"]
    empty = start_server()
    assert kvstore(empty, "import", "chain", str(tmp_path / "full")).returncode == 0
    skipped = kvstore(empty, "import", "chain", str(tmp_path / "delta1"))
    first_end = json.loads((tmp_path / "full" / "manifest.json").read_text())["sequence"]
    delta1_start = json.loads((tmp_path / "delta1" / "manifest.json").read_text())["since_sequence"]
    assert skipped.returncode == 1 and "FAILED_PRECONDITION" in skipped.stderr
    assert f"starts at sequence {delta1_start}" in skipped.stderr and f"ended at sequence {first_end}" in skipped.stderr
    for n in range(3):
        done = kvstore(empty, "import", "chain", str(tmp_path / f"delta{n}"))
        assert done.returncode == 0, done.stderr
    with KVStoreClient(empty.address, timeout=60.0) as rebuilt:
        assert rows_of(rebuilt, "chain") == rows_of(primary_client, "chain")


def test_bad_replication_requests_get_clear_errors_and_change_nothing(primary, primary_client):
    from kvstore_client import InvalidArgumentError, NotFoundError
    from kvstore_client.replication import DeltaPart

    small_table(primary_client, "strict")
    primary_client.update("strict", [1, 2], np.ones((2, 8), np.float32))
    before = rows_of(primary_client, "strict")
    with pytest.raises(NotFoundError, match="no_such_table"):
        next(primary_client.subscribe(["no_such_table"]))
    with pytest.raises(InvalidArgumentError, match="interval_seconds"):
        next(primary_client.subscribe(interval_seconds=-1.0))
    with pytest.raises(InvalidArgumentError, match="since_sequence"):
        primary_client.export_sequenced("strict", since_sequence=-5)
    part = DeltaPart(np.array([3]), np.zeros((1, 8), np.float32), None, None, np.array([1]))
    with pytest.raises(FailedPreconditionError, match="no import to continue"):
        primary_client.import_chain("strict", [part], sequence=10, since_sequence=5)
    with pytest.raises(InvalidArgumentError, match="rows.mode"):
        primary_client.import_chain("strict", [part], sequence=10, since_sequence=5, mode="replace")
    assert rows_of(primary_client, "strict") == before


def test_a_subscriber_gets_changed_rows_with_their_latest_value_and_tombstones(primary, primary_client):
    small_table(primary_client, "feed", optimizer={"name": "adagrad"})
    primary_client.update("feed", [1, 2, 3], np.ones((3, 8), np.float32))
    stream = primary_client.subscribe(["feed"], weights_only=True, interval_seconds=1.0, timeout=DEADLINE)
    start = next(stream)
    assert start.batch_end and start.table == ""
    for step in range(5):                                     # one hot row, within one interval
        primary_client.update("feed", [2], np.full((1, 8), step, np.float32))
    primary_client.delete("feed", [3])
    rows, tombstones = {}, []
    for batch in stream:
        if batch.table:
            assert batch.state is None                        # weights_only
            rows.update({int(i): w for i, w in zip(batch.ids, batch.weights, strict=True)})
            tombstones += batch.tombstones.tolist()
        if batch.batch_end and batch.sequence >= start.sequence + 6:
            break
    assert sorted(rows) == [2] and (rows[2] == 4).all() and tombstones == [3]


def test_a_replica_that_never_reached_its_primary_is_not_serving_and_refuses_writes(start_server, tmp_path):
    nowhere = f"127.0.0.1:{free_port()}"                      # nothing listens there
    replica = start_server("--replica-of", nowhere, "--replication-retry-seconds", "0.5", metrics_port=free_port())
    with KVStoreClient(replica.address, timeout=60.0) as replica_client:
        assert replica_client.health() == "NOT_SERVING"
        with pytest.raises(FailedPreconditionError, match=nowhere):
            replica_client.create_table("x", 4)
        with pytest.raises(FailedPreconditionError, match=nowhere):              # a client-streamed write
            replica_client.update("x", [1], np.ones((1, 4), np.float32))
        assert replica_client.list_tables() == []
    assert value(scrape(replica), "kvstore_replica_connected", primary=nowhere) == 0


def _link(table: str, key: str, sequence: int, since: int | None, value: float) -> list:
    """Three ImportChain chunks under `key`: two of rows (ids 10..13 = `value`), then tombstones of id 1."""
    from kvstore_proto.tensors import encode_ids, encode_tensor
    from kvstore_proto.v1 import kvstore_pb2 as pb

    chunks = [pb.ImportChainRequest(rows=pb.ImportRequest(table=table, ids=encode_ids(np.arange(start, start + 2)),
                                                          weights=encode_tensor(np.full((2, 8), value, np.float32))))
              for start in (10, 12)]
    chunks[0].rows.idempotency_key, chunks[0].sequence = key, sequence
    if since is not None:
        chunks[0].since_sequence = since
    chunks.append(pb.ImportChainRequest(tombstones=encode_ids(np.array([1]))))
    chunks[-1].rows.last = True
    return chunks


def test_a_chain_link_cancelled_before_its_last_chunk_applies_nothing_and_a_retried_link_applies_once(
        primary, primary_client):
    import grpc
    from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc

    small_table(primary_client, "linked")
    primary_client.update("linked", [1, 2], np.ones((2, 8), np.float32))
    before = rows_of(primary_client, "linked")
    stub = pb_grpc.EmbeddingStoreStub(primary_client._channel)
    held = TwoThenHold(_link("linked", "full-1", 5, None, 2.0))
    call = stub.ImportChain.future(iter(held), timeout=60)
    assert held.asked_for_third.wait(30)
    call.cancel()
    held.release.set()
    with pytest.raises(grpc.FutureCancelledError):
        call.result()
    assert rows_of(primary_client, "linked") == before
    with pytest.raises(grpc.RpcError) as refused:                                    # the chain did not start
        stub.ImportChain(iter(_link("linked", "delta-1", 7, 5, 3.0)), timeout=60)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no import to continue" in refused.value.details()

    assert stub.ImportChain(iter(_link("linked", "full-1", 5, None, 2.0)), timeout=60).rows == 4
    first = stub.ImportChain(iter(_link("linked", "delta-1", 7, 5, 3.0)), timeout=60)
    again = stub.ImportChain(iter(_link("linked", "delta-1", 7, 5, 3.0)), timeout=60)   # not refused: 7 != 5
    assert first.rows == again.rows == 4
    rows = rows_of(primary_client, "linked")
    assert 1 not in rows and rows[2] == before[2]
    assert rows[10][:32] == np.full(8, 3.0, np.float32).tobytes()


def test_idle_subscribers_hold_no_store_thread(start_server):
    server = start_server("--max-workers", "1")            # one store thread for every call
    with KVStoreClient(server.address, timeout=DEADLINE) as client:
        small_table(client, "idle")
        streams = [client.subscribe(["idle"], interval_seconds=0.01, timeout=DEADLINE) for _ in range(4)]
        starts = [next(stream) for stream in streams]          # all four subscribed and waiting
        client.update("idle", [7], np.full((1, 8), 5.0, np.float32))     # runs on the one store thread
        assert (client.lookup("idle", [7], on_miss="error") == 5.0).all()
        for stream, start in zip(streams, starts, strict=True):
            changed = next(batch for batch in stream if batch.table == "idle")
            assert changed.ids.tolist() == [7] and changed.sequence > start.sequence
            stream.close()


def test_a_replica_refuses_training_steps_and_keeps_its_rows(start_server, primary, primary_client):
    """A `Train` step steps rows and may store looked-up ones: a replica refuses it as every write,
    FAILED_PRECONDITION naming the primary, and its rows stay the primary's."""
    from kvstore_client.training_stream import TrainingStream

    small_table(primary_client, "trained")
    primary_client.update("trained", np.arange(4), np.ones((4, 8), np.float32))
    replica = start_server("--replica-of", primary.address)
    with KVStoreClient(replica.address, timeout=60.0) as replica_client:
        assert wait_until(lambda: "trained" in replica_client.list_tables() and
                          replica_client.lookup("trained", [3], on_miss="zeros").any(), timeout=60)
        with TrainingStream(replica_client) as stream:
            step = stream.send(gradients={"trained": ([1, 2], np.ones((2, 8), np.float32))},
                               lookups={"trained": [1, 100]})
            with pytest.raises(FailedPreconditionError, match=primary.address):
                step.result()
        np.testing.assert_array_equal(replica_client.lookup("trained", np.arange(4), on_miss="error"), np.ones((4, 8)))
        assert not replica_client.lookup("trained", [100], on_miss="zeros").any()     # nothing was stored
