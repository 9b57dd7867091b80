"""The training collection and the Train stream over 3 local shards equal one server; bounded staleness."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from kvstore_client import InvalidArgumentError, KVStoreClient  # noqa: E402
from kvstore_client.collection import Feature, RemoteEmbeddingBagCollection  # noqa: E402
from kvstore_client.sharded_training import ShardedTrainingStream, open_training_stream  # noqa: E402
from kvstore_client.training_stream import TrainingStream  # noqa: E402

from .conftest import random_rows, small_table  # noqa: E402
from .test_torch_modules import DIM, LR, STEPS, TwoFeatures, _train_two, _two_feature_batches  # noqa: E402


@pytest.fixture(scope="module")
def sharded(start_server):
    with KVStoreClient(start_server("--shards", "3").address) as opened:
        yield opened


def _tables(client, run: str) -> list[str]:
    names = [f"{run}_users", f"{run}_items"]
    for table in names:
        small_table(client, table, DIM, optimizer={"name": "adagrad", "lr": LR},
                    initializer={"kind": "uniform", "scale": 0.1, "seed": 11})
    return names


def _collection(client, tables: list[str], **options) -> RemoteEmbeddingBagCollection:
    return RemoteEmbeddingBagCollection(client, [Feature("user", tables[0], "sum"), Feature("item", tables[1], "mean")],
                                        **options)


@pytest.mark.parametrize("pipeline", [False, True, "prefetch"])
def test_collection_on_three_shards_equals_one_server_over_50_steps(sharded, client, pipeline):
    """Same losses and same final rows and optimizer state, bit for bit, with duplicates in every batch."""
    on_cluster, on_one = _tables(sharded, f"sh_coll_{pipeline}"), _tables(client, f"one_coll_{pipeline}")
    assert isinstance(_collection(sharded, on_cluster).stream, ShardedTrainingStream)
    ours = _train_two(TwoFeatures(_collection(sharded, on_cluster, pipeline=bool(pipeline))),
                      prefetch=pipeline == "prefetch")
    theirs = _train_two(TwoFeatures(_collection(client, on_one, pipeline=bool(pipeline))),
                        prefetch=pipeline == "prefetch")
    assert len(ours) == STEPS and ours == theirs and ours[0] != ours[-1]
    for mine, other, ids in zip(on_cluster, on_one, (np.arange(10), np.arange(30)), strict=True):
        (weights, state), (their_weights, their_state) = (c.lookup(t, ids, on_miss="error", with_state=True)
                                                          for c, t in ((sharded, mine), (client, other)))
        np.testing.assert_array_equal(weights, their_weights)
        np.testing.assert_array_equal(state, their_state)


def test_a_sharded_train_step_answers_as_one_server(sharded, client):
    """Stepped counts add up over shards and looked-up rows come back in request order, duplicates included."""
    for c in (sharded, client):
        small_table(c, "sh_step", DIM, optimizer={"name": "sgd", "lr": 0.5},
                    initializer={"kind": "uniform", "scale": 0.1, "seed": 5})
    ids = np.random.default_rng(2).integers(-50, 50, 300)
    grads = random_rows(len(ids), DIM, seed=3)
    answers = []
    for c in (sharded, client):
        stream = open_training_stream(c)
        first = stream.send(gradients={"sh_step": (ids, grads)}, lookups={"sh_step": ids[::-1]})
        empty = stream.send(lookups={"sh_step": np.arange(0)})
        answers.append((first.result(), empty.result()))
        stream.close()
    (stepped, rows), (_, no_rows) = answers[0]
    assert stepped == answers[1][0][0] == {"sh_step": len(np.unique(ids))}
    np.testing.assert_array_equal(rows["sh_step"], answers[1][0][1]["sh_step"])
    assert rows["sh_step"].flags.writeable and no_rows["sh_step"].shape == (0, DIM)
    assert isinstance(open_training_stream(client), TrainingStream)


def test_a_refused_step_names_its_shard_and_the_stream_goes_on(sharded):
    small_table(sharded, "sh_refused", DIM)
    stream = open_training_stream(sharded)
    ids = np.arange(30)
    bad = stream.send(gradients={"sh_refused": (ids, np.full((30, DIM), np.nan, np.float32))})
    with pytest.raises(InvalidArgumentError, match=r"shard \d \(.*NaN"):
        bad.result()
    stepped, rows = stream.send(lookups={"sh_refused": ids}).result()
    assert rows["sh_refused"].shape == (30, DIM)
    np.testing.assert_array_equal(rows["sh_refused"], sharded.lookup("sh_refused", ids))   # nothing was stepped
    stream.close()


@pytest.mark.parametrize("named", [None, "in forward"])
@pytest.mark.parametrize("staleness", [1, 3])
@pytest.mark.parametrize("where", ["one", "cluster"])
def test_staleness_reads_at_most_k_steps_behind_and_keeps_every_gradient(client, sharded, where, staleness, named):
    """SGD with lr 1 on zero rows, every id once per step: a row read by step i holds -j for some j in
    [i - k, i]; after flush every row holds -steps, as in the exact loop. With the next batch named
    in the forward, its lookup still goes behind the step's gradients."""
    target = client if where == "one" else sharded
    table = f"stale_{where}_{staleness}_{bool(named)}"
    small_table(target, table, DIM, optimizer={"name": "sgd", "lr": 1.0}, initializer={"kind": "zeros"})
    collection = RemoteEmbeddingBagCollection(target, [Feature("f", table, "sum")], staleness=staleness)
    ids = torch.arange(12).reshape(12, 1)
    for step in range(20):
        pooled = collection({"f": ids}, next_batch={"f": ids} if named else None)["f"]
        read = -pooled[:, 0].detach().numpy()
        assert ((read >= max(0, step - staleness)) & (read <= step)).all(), (step, read)
        pooled.sum().backward()
    collection.flush()
    np.testing.assert_array_equal(target.lookup(table, np.arange(12), on_miss="error"),
                                  np.full((12, DIM), -20.0, np.float32))
    collection.close()


@pytest.mark.parametrize("options, message", [({"staleness": -1}, "staleness"), ({"staleness": 1.5}, "staleness"),
                                              ({"staleness": 2, "pipeline": False}, "pipeline")])
def test_bad_staleness_is_refused(client, options, message):
    with pytest.raises(ValueError, match=message):
        RemoteEmbeddingBagCollection(client, [Feature("f", "any")], **options)


def test_exact_is_the_default(client):
    collection = RemoteEmbeddingBagCollection(client, [Feature("f", "any")])
    assert collection.staleness == 0 and collection._reads is collection.stream


@pytest.mark.parametrize("where", ["one", "cluster"])
def test_a_lookup_fills_the_callers_buffer_in_request_order(client, sharded, where):
    target = client if where == "one" else sharded
    small_table(target, f"into_{where}", DIM, initializer={"kind": "uniform", "scale": 0.1, "seed": 4})
    ids = np.random.default_rng(5).integers(-300, 300, 500)
    buffer = np.full((len(ids), DIM), np.nan, np.float32)
    got = target.lookup(f"into_{where}", ids, out=buffer)
    assert got is buffer
    np.testing.assert_array_equal(buffer, target.lookup(f"into_{where}", ids))


@pytest.mark.parametrize("bad", [np.zeros((499, DIM), np.float32), np.zeros((500, DIM + 1), np.float32),
                                 np.zeros((500, DIM), np.float64), [[0.0] * DIM] * 500])
def test_a_buffer_that_does_not_fit_is_invalid_argument_naming_out(sharded, bad):
    if "into_bad" not in sharded.list_tables():
        small_table(sharded, "into_bad", DIM)
    with pytest.raises(InvalidArgumentError, match="out: expected"):
        sharded.lookup("into_bad", np.arange(500), out=bad)


@pytest.mark.parametrize("where_named", ["after forward", "after backward", "in forward"])
@pytest.mark.parametrize("where", ["one", "cluster"])
def test_looking_up_the_next_batch_ahead_gives_the_exact_result(client, sharded, where, where_named):
    target = client if where == "one" else sharded
    run = f"{where}_{where_named.replace(' ', '_')}"
    ahead, plain = _tables(target, f"ahead_{run}"), _tables(target, f"plain_{run}")
    expected = _train_two(TwoFeatures(_collection(target, plain)))
    assert _train_two(TwoFeatures(_collection(target, ahead)), ahead=where_named) == expected
    for mine, theirs, ids in zip(ahead, plain, (np.arange(10), np.arange(30)), strict=True):
        np.testing.assert_array_equal(target.lookup(mine, ids, with_state=True)[1],
                                      target.lookup(theirs, ids, with_state=True)[1])


def test_a_next_forward_with_other_ids_looks_them_up_as_usual(client):
    tables = _tables(client, "ahead_other")
    collection = _collection(client, tables, pipeline=False)
    collection.next_batch({"user": torch.tensor([[1]]), "item": (torch.tensor([2, 3]), torch.tensor([0]))})
    out = collection({"user": torch.tensor([[4]]), "item": (torch.tensor([5]), torch.tensor([0]))})
    np.testing.assert_array_equal(out["user"].detach().numpy(), client.lookup(tables[0], [4]))
    np.testing.assert_array_equal(out["item"].detach().numpy(), client.lookup(tables[1], [5]))
    collection.close()


def _train_leaving_items_out(collection: RemoteEmbeddingBagCollection, ahead: str | None) -> list[float]:
    """Every other step's loss uses only the user feature, so the items' gradients of the step
    before are held back and go with the next forward; with `ahead`, each next batch is named
    right after its forward ("after forward") or by it ("in forward")."""
    batches, losses = list(_two_feature_batches(6)), []
    for step, (users, items, offsets, target) in enumerate(batches):
        named = ahead == "in forward" and step + 1 < len(batches)
        after = batches[step + 1] if named else None
        out = collection({"user": users, "item": (items, offsets)},
                         next_batch=None if after is None else {"user": after[0], "item": (after[1], after[2])})
        if ahead == "after forward" and step + 1 < len(batches):
            later = batches[step + 1]
            collection.next_batch({"user": later[0], "item": (later[1], later[2])})
        pooled = out["user"] if step % 2 else out["user"] + out["item"]
        loss = ((pooled.sum(1, keepdim=True) - target) ** 2).mean()
        loss.backward()
        losses.append(loss.item())
    collection.flush()
    return losses


@pytest.mark.parametrize("named", ["after forward", "in forward"])
@pytest.mark.parametrize("where", ["one", "cluster"])
def test_a_batch_named_ahead_sees_gradients_held_back_to_the_next_forward(client, sharded, where, named):
    """The next batch's lookup goes out before this step's gradients; rows those gradients (and
    gradients held back from an earlier step) change are read again behind them: losses, rows and
    optimizer state equal the loop that waits for every call."""
    target = client if where == "one" else sharded
    run = f"{where}_{named.replace(' ', '_')}"
    ahead, plain = _tables(target, f"held_ahead_{run}"), _tables(target, f"held_plain_{run}")
    expected = _train_leaving_items_out(_collection(target, plain, pipeline=False), ahead=None)
    assert _train_leaving_items_out(_collection(target, ahead), ahead=named) == expected
    for mine, theirs, ids in zip(ahead, plain, (np.arange(10), np.arange(30)), strict=True):
        for got, want in zip(target.lookup(mine, ids, with_state=True), target.lookup(theirs, ids, with_state=True),
                             strict=True):
            np.testing.assert_array_equal(got, want)
