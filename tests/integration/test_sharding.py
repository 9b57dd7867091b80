"""Scale-out: a cluster of 3 local shards (`kvstore-server --shards 3`) against one server, through the client."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from kvstore_client import (
    FailedPreconditionError,
    InvalidArgumentError,
    KVStoreClient,
    NotFoundError,
    UnavailableError,
)
from kvstore_client.shard_map import ShardMap
from kvstore_client.sharding import ShardedClient

from .conftest import ServerProcess, random_rows

# A cache that holds every row of a test on one server too: prefetch counts rows cached, which
# depends on capacity, and the cluster has three caches.
TABLE = {"cache": {"rows": 4096, "ways": 8}, "initializer": {"kind": "uniform", "scale": 0.1, "seed": 7},
         "optimizer": {"name": "adagrad", "lr": 0.05}}


@pytest.fixture(scope="module")
def cluster(start_server) -> ServerProcess:
    return start_server("--shards", "3")


@pytest.fixture(scope="module")
def sharded(cluster):
    with KVStoreClient(cluster.address) as opened:
        yield opened


@pytest.fixture(scope="module")
def single(start_server):
    with KVStoreClient(start_server().address) as opened:
        yield opened


def shard_pids(parent: ServerProcess) -> list[int]:
    """The shard processes of a `--shards` parent, in shard order (they are started in order)."""
    pid = parent.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(child) for child in children)


def both(sharded, single, call):
    return call(sharded), call(single)


def test_a_cluster_address_list_makes_a_sharded_client(cluster, sharded):
    assert isinstance(sharded, ShardedClient)
    assert sharded.addresses == cluster.address.split(",") and len(sharded.shards) == 3
    manifests = [json.loads((cluster.data_dir / f"shard-{i}" / "cluster.json").read_text()) for i in range(3)]
    assert [m["shard_index"] for m in manifests] == [0, 1, 2]
    assert {m["cluster_id"] for m in manifests} == {sharded.cluster_id}


def test_every_operation_equals_a_single_server_for_the_same_seeds(sharded, single):
    for client in (sharded, single):
        client.create_table("same", 8, **TABLE)
    rng = np.random.default_rng(3)
    ids = rng.integers(-1000, 1000, 600)                        # duplicates and negative ids included
    first = both(sharded, single, lambda c: c.lookup("same", ids))
    np.testing.assert_array_equal(*first)
    grads = random_rows(len(ids), 8, seed=1)
    assert len(set(both(sharded, single, lambda c: c.apply_gradients("same", ids, grads, scores=None)))) == 1
    written = both(sharded, single, lambda c: c.update("same", ids[:50], random_rows(50, 8, seed=2)))
    assert written[0] == written[1] == len(np.unique(ids[:50]))
    assert len(set(both(sharded, single, lambda c: c.delete("same", ids[50:80])))) == 1
    assert len(set(both(sharded, single, lambda c: c.prefetch("same", ids[100:300])))) == 1
    more = np.concatenate([ids, [5555]])
    (weights, state), (single_weights, single_state) = both(
        sharded, single, lambda c: c.lookup("same", more, on_miss="zeros", with_state=True))
    np.testing.assert_array_equal(weights, single_weights)
    np.testing.assert_array_equal(state, single_state)
    np.testing.assert_array_equal(*both(sharded, single, lambda c: c.lookup("same", more, on_miss="init")))
    with pytest.raises(NotFoundError):
        sharded.lookup("same", ids[50:51], on_miss="error")
    exported = both(sharded, single, lambda c: c.export_table("same"))
    for field in ("ids", "weights", "state"):
        np.testing.assert_array_equal(getattr(exported[0], field), getattr(exported[1], field))
    assert sharded.describe_table("same") == single.describe_table("same")
    stats = both(sharded, single, lambda c: c.stats("same"))
    assert stats[0]["rows_stepped"] == stats[1]["rows_stepped"] > 0
    assert "same" in sharded.list_tables()
    assert sharded.health() == "SERVING" and isinstance(sharded.evict("same"), dict)


def test_the_shard_map_is_the_documented_function():
    from kvstore_client.shard_map import splitmix64

    # splitmix64's first output from state 0 (Vigna's reference implementation): the map must never drift
    assert int(splitmix64(np.array([0]))[0]) == 0xE220A8397B1DCDAF
    ids = np.array([0, 1, 2, -1, 2**62, -(2**63)])
    expected = [int(v) % 3 for v in splitmix64(ids)]
    assert ShardMap(3).shard_of(ids).tolist() == expected
    assert ShardMap(4, "block", 10).shard_of(np.array([-11, -1, 0, 9, 10, 35, 45])).tolist() == [2, 3, 0, 0, 1, 3, 0]


def test_shards_must_be_positive(tmp_path):
    started = subprocess.run([sys.executable, "-m", "kvstore_server", "--data-dir", str(tmp_path), "--shards", "0"],
                             capture_output=True, text=True, timeout=60)
    assert started.returncode == 2 and "--shards: must be at least 1, got 0" in started.stderr


def test_empty_batches_and_unknown_tables_behave_as_on_one_server(sharded, single):
    sharded.create_table("empty_batch", 4)
    single.create_table("empty_batch", 4)
    assert both(sharded, single, lambda c: c.lookup("empty_batch", np.arange(0)).shape) == ((0, 4), (0, 4))
    for client in (sharded, single):
        with pytest.raises(NotFoundError, match="table"):
            client.lookup("no_such_table", [1, 2, 3])


@pytest.mark.parametrize("kind", ["uniform", "zipf", "sequential"])
def test_hashing_balances_rows_within_10_percent(sharded, kind):
    rng = np.random.default_rng(11)
    ids = {"uniform": lambda: rng.integers(-2**62, 2**62, 30000),
           "zipf": lambda: rng.zipf(1.1, 200000),
           "sequential": lambda: np.arange(30000)}[kind]()
    table = f"balance_{kind}"
    sharded.create_table(table, 2, cache={"rows": 64, "ways": 8})
    unique = np.unique(ids)
    sharded.prefetch(table, unique)                             # stores every distinct id once
    per_shard = [s["rows_initialized"] for s in sharded.shard_stats(table)]
    assert sum(per_shard) == len(unique) > 3000
    mean = len(unique) / 3
    assert max(abs(rows - mean) / mean for rows in per_shard) < 0.10, per_shard


def test_cluster_snapshot_and_restore_round_trip(sharded):
    sharded.create_table("snapped", 8, **TABLE)
    ids = np.arange(900)
    sharded.update("snapped", ids, random_rows(900, 8, seed=4))
    before = sharded.export_table("snapped")
    info = sharded.create_snapshot("cluster-1")
    assert info["rows"]["snapped"] > 0 and len(info["shards"]) == 3
    assert "cluster-1" in [s["name"] for s in sharded.list_snapshots()]
    sharded.update("snapped", ids, np.zeros((900, 8), np.float32))
    sharded.delete("snapped", ids[:100])
    restored = sharded.restore_snapshot("cluster-1")
    assert restored["name"] == "cluster-1" and restored["restore_seconds"] >= 0
    after = sharded.export_table("snapped")
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.weights, after.weights)
    assert not [s for s in sharded.list_snapshots() if s["name"].startswith("undo-restore-")]
    sharded.delete_snapshot("cluster-1")
    assert "cluster-1" not in [s["name"] for s in sharded.list_snapshots()]


def test_restore_that_fails_on_one_shard_leaves_every_shard_as_it_was(cluster, sharded):
    sharded.create_table("undone", 4)
    ids = np.arange(300)
    sharded.update("undone", ids, np.ones((300, 4), np.float32))
    sharded.create_snapshot("half-broken")
    shutil.rmtree(cluster.data_dir / "shard-2" / "snapshots" / "half-broken" / "db")   # shard 2's copy is gone
    sharded.update("undone", ids, np.full((300, 4), 2.0, np.float32))
    with pytest.raises(FailedPreconditionError, match=r"every shard serves its data from before the restore .*"
                                                      r"shard 2 \(.*cannot copy snapshot 'half-broken'"):
        sharded.restore_snapshot("half-broken")
    assert (sharded.lookup("undone", ids, on_miss="error") == 2.0).all()


def test_snapshot_missing_on_one_shard_is_not_found_and_restores_nothing(sharded):
    sharded.create_table("partial_snap", 4)
    sharded.shards[1].create_snapshot("only-on-1")
    with pytest.raises(NotFoundError, match=r"missing on shard 0 .* shard 2"):
        sharded.restore_snapshot("only-on-1")
    assert "only-on-1" not in [s["name"] for s in sharded.list_snapshots()]
    sharded.delete_snapshot("only-on-1")                       # finishes on the shard that has it


def test_a_lost_shard_is_refilled_from_a_cluster_export_without_touching_the_others(sharded):
    sharded.create_table("refill", 4)
    ids = np.arange(1200)
    sharded.update("refill", ids, np.ones((1200, 4), np.float32))
    backup = sharded.export_table("refill")
    owner = ShardMap(3).shard_of(ids)
    sharded.shards[1].delete("refill", ids[owner == 1])               # shard 1 lost its rows
    sharded.update("refill", ids[owner != 1], np.full(((owner != 1).sum(), 4), 5.0, np.float32))
    assert sharded.import_chunks("refill", [backup], shards=[1]) == (owner == 1).sum()
    rows = sharded.lookup("refill", ids, on_miss="error")
    assert (rows[owner == 1] == 1.0).all() and (rows[owner != 1] == 5.0).all()


def test_a_client_whose_view_differs_from_the_manifest_is_refused(cluster, sharded):
    addresses = cluster.address.split(",")
    cases = [(addresses[::-1], {}, "shard_index: server 2, client 0"),
             (addresses[:2], {}, "shards: server 3, client 2"),
             (addresses, {"function": "block", "block_size": 100}, "function: server 'hash', client 'block'")]
    for order, options, difference in cases:
        with pytest.raises(FailedPreconditionError, match=r"shard \d .*" + difference):
            KVStoreClient(order, **options)
    sharded.create_table("after_refusal", 4)                    # the cluster itself is unchanged
    assert sharded.lookup("after_refusal", [1, 2, 3]).shape == (3, 4)


def test_a_server_started_on_another_shards_data_dir_refuses_to_start(cluster, tmp_path):
    data_dir = tmp_path / "moved"
    data_dir.mkdir()
    shutil.copy(cluster.data_dir / "shard-1" / "cluster.json", data_dir / "cluster.json")
    started = subprocess.run([sys.executable, "-m", "kvstore_server", "--data-dir", str(data_dir), "--port", "0",
                              "--shard-index", "kvstore-0"], capture_output=True, text=True, timeout=60)
    assert started.returncode == 1
    assert "this server is shard 0" in started.stderr and "holds shard 1" in started.stderr


def test_servers_with_tables_but_no_manifest_are_not_taken_as_a_cluster(start_server, single):
    single.create_table("orphan", 4)
    with pytest.raises(FailedPreconditionError, match=r"shard 1 .* holds tables but no shard has a manifest"):
        KVStoreClient([start_server().address, single.address])


def test_a_killed_shard_is_unavailable_by_name_while_the_others_serve(tmp_path):
    cluster = ServerProcess(tmp_path / "data", "--shards", "3").start()
    try:
        with KVStoreClient(cluster.address) as client:
            client.create_table("kill", 4)
            ids = np.arange(3000)
            client.update("kill", ids, np.ones((3000, 4), np.float32))
            victim = shard_pids(cluster)[1]
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(UnavailableError, match=r"shard 1 \(127\.0\.0\.1:\d+\)") as failure:
                client.lookup("kill", ids)
            assert failure.value.shard == 1
            with pytest.raises(UnavailableError, match=r"shard 1 .*shards \[0, 2\] applied their part") as failure:
                client.update("kill", ids, np.full((3000, 4), 3.0, np.float32))
            assert failure.value.applied_shards == [0, 2]
            owner = ShardMap(3).shard_of(ids)
            survivors = ids[owner != 1]
            assert (client.lookup("kill", survivors, on_miss="error") == 3.0).all()
            assert client.apply_gradients("kill", survivors, np.ones((len(survivors), 4), np.float32)) > 0
    finally:
        assert cluster.stop() == 1                              # one shard did not exit cleanly


def test_reshard_3_to_5_keeps_every_row(cluster, sharded, start_server):
    sharded.create_table("moving", 8, **TABLE)
    ids = np.random.default_rng(5).integers(-10**9, 10**9, 4000)
    sharded.apply_gradients("moving", ids, random_rows(len(ids), 8, seed=6))
    before = sharded.export_table("moving")
    target = start_server("--shards", "5")
    moved = subprocess.run([sys.executable, "-m", "kvstore_client", "--quiet", "--address", cluster.address,
                            "reshard", "moving", "--to", "5", "--target", target.address],
                           capture_output=True, text=True, timeout=120)
    assert moved.returncode == 0, moved.stderr
    assert f"{len(before.ids):,} rows onto 5 shards" in moved.stdout and "verified" in moved.stdout
    with KVStoreClient(target.address) as five:
        after = five.export_table("moving")
        for field in ("ids", "weights", "state", "meta"):
            np.testing.assert_array_equal(getattr(before, field), getattr(after, field))
        np.testing.assert_array_equal(five.lookup("moving", ids), sharded.lookup("moving", ids))
        assert five.describe_table("moving") == sharded.describe_table("moving")
    again = subprocess.run([sys.executable, "-m", "kvstore_client", "--quiet", "--address", cluster.address,
                            "reshard", "moving", "--to", "5", "--target", cluster.address],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "--target: 3 addresses for --to 5 shards" in again.stderr


def test_remote_embedding_bag_trains_and_checkpoints_on_a_cluster_as_on_one_server(sharded, single):
    torch = pytest.importorskip("torch")
    from kvstore_client.torch_modules import RemoteEmbeddingBag

    def train(client, table: str) -> tuple[list[float], dict, RemoteEmbeddingBag]:
        client.create_table(table, 4, **TABLE)
        torch.manual_seed(0)
        bag, head = RemoteEmbeddingBag(client, table, mode="sum", pin=True), torch.nn.Linear(4, 1)
        dense, rng, losses = torch.optim.SGD(head.parameters(), lr=0.1), np.random.default_rng(9), []
        for _ in range(10):
            ids = torch.from_numpy(rng.integers(0, 300, 64))
            out = head(bag(ids, torch.arange(0, 64, 4)))
            loss = (out ** 2).mean()
            dense.zero_grad()
            loss.backward()
            dense.step()
            losses.append(loss.item())
        return losses, bag.state_dict(), bag

    (ours, our_state, bag), (theirs, their_state, _) = train(sharded, "torch_bag"), train(single, "torch_bag")
    assert ours == theirs and ours[-1] != ours[0]
    for key in ("ids", "weight", "optimizer_state"):
        torch.testing.assert_close(our_state[key], their_state[key], rtol=0, atol=0)
    columns = [0, 2]                                            # access count, optimizer step (not the clock)
    torch.testing.assert_close(our_state["row_meta"][:, columns], their_state["row_meta"][:, columns], rtol=0, atol=0)
    sharded.update("torch_bag", np.arange(300), np.zeros((300, 4), np.float32))
    bag.load_state_dict(our_state)                              # the checkpoint goes back, each row to its shard
    np.testing.assert_array_equal(sharded.lookup("torch_bag", our_state["ids"].numpy(), on_miss="error"),
                                  our_state["weight"].numpy())


@pytest.mark.parametrize("address, options, field", [
    ([], {}, "address"), (["a:1", "a:1"], {}, "address: a shard appears twice"),
    (["a:1", "b:1"], {"function": "modulo"}, "function"), (["a:1", "b:1"], {"function": "block"}, "block_size"),
    ("kvstore.ns.svc:50051", {"replicas": 0}, "replicas"), (["a:1", "b:1"], {"replicas": 2}, "replicas"),
])
def test_bad_shard_lists_and_maps_are_invalid_argument(address, options, field):
    with pytest.raises(InvalidArgumentError, match=field):
        KVStoreClient(address, **options)


def test_a_bad_manifest_is_invalid_argument_and_changes_nothing(cluster, sharded):
    from kvstore_proto.v1 import kvstore_pb2 as pb

    stub = sharded.shards[0]._stub
    before = (cluster.data_dir / "shard-0" / "cluster.json").read_text()
    for manifest, field in ((dict(cluster_id="x", shards=3, function="hash", shard_index=3), "manifest.shard_index"),
                            (dict(cluster_id="x", shards=0, function="hash"), "manifest.shards"),
                            (dict(cluster_id="", shards=3, function="hash"), "manifest.cluster_id")):
        with pytest.raises(grpc.RpcError) as failure:
            stub.SetClusterManifest(pb.SetClusterManifestRequest(manifest=pb.ClusterManifest(**manifest)))
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in failure.value.details()
    other = pb.ClusterManifest(cluster_id="another", shards=3, function="hash", shard_index=0)
    with pytest.raises(grpc.RpcError) as failure:
        stub.SetClusterManifest(pb.SetClusterManifestRequest(manifest=other))
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cluster_id" in failure.value.details()
    assert (cluster.data_dir / "shard-0" / "cluster.json").read_text() == before


def test_rows_that_do_not_match_their_ids_are_invalid_argument_on_a_cluster(sharded):
    sharded.create_table("shapes", 4)
    for call in (lambda: sharded.import_table("shapes", [1, 2, 3], np.ones((2, 4), np.float32)),
                 lambda: sharded.import_chunks("shapes", [([1, 2, 3], np.ones((3, 4), np.float32), np.ones((1, 1)))]),
                 lambda: sharded.update("shapes", [1, 2, 3], np.ones((2, 4), np.float32))):
        with pytest.raises(InvalidArgumentError, match="weights|state"):
            call()
    assert sharded.export_table("shapes").ids.size == 0
