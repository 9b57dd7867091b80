"""RemoteEmbedding(Bag) trains like nn.Embedding(Bag), with the optimizer on the server."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from kvstore_client.torch_modules import RemoteEmbedding, RemoteEmbeddingBag  # noqa: E402
from torch import nn  # noqa: E402

from .conftest import small_table  # noqa: E402

ROWS, DIM, STEPS, LR = 200, 8, 50, 0.1


def _batches(seed: int, overlap: bool = False):
    """Bags of ids (with offsets and per-sample weights) and targets; `overlap` makes each batch
    share ids with the next, so a prefetch of batch i+1 reads rows batch i is about to change."""
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        lengths = rng.integers(1, 5, 16)
        ids = rng.integers(0, 40 if overlap else ROWS, lengths.sum())
        offsets = np.r_[0, np.cumsum(lengths)[:-1]]
        yield (torch.from_numpy(ids), torch.from_numpy(offsets), torch.from_numpy(rng.random(len(ids),
               dtype=np.float32)), torch.from_numpy(rng.standard_normal((16, 1), dtype=np.float32)))


class Model(nn.Module):
    def __init__(self, bag: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.bag = bag
        self.head = nn.Linear(DIM, 1)

    def forward(self, ids, offsets, weights):
        kwargs = {"per_sample_weights": weights} if self.bag.mode == "sum" else {}
        return self.head(self.bag(ids, offsets, **kwargs))


def _train(model: Model, batches, prefetch: bool = False) -> list[float]:
    dense = torch.optim.SGD(model.head.parameters(), lr=LR)
    losses = []
    batches = list(batches)
    for i, (ids, offsets, weights, target) in enumerate(batches):
        out = model(ids, offsets, weights)
        if prefetch and i + 1 < len(batches):
            model.bag.prefetch(batches[i + 1][0])
        loss = ((out - target) ** 2).mean()
        dense.zero_grad()
        if hasattr(model.bag, "weight"):
            model.bag.weight.grad = None
        loss.backward()
        dense.step()
        if hasattr(model.bag, "weight"):
            with torch.no_grad():
                model.bag.weight -= LR * model.bag.weight.grad   # plain SGD, as the server applies it
        losses.append(loss.item())
    return losses


def _local_bag(client, table: str, mode: str) -> nn.EmbeddingBag:
    local = nn.EmbeddingBag(ROWS, DIM, mode=mode)
    local.weight.data = torch.from_numpy(client.lookup(table, np.arange(ROWS), on_miss="init"))
    return local


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_remote_embedding_bag_loss_curve_equals_nn_embedding_bag(client, mode):
    table = f"bag_{mode}"
    small_table(client, table, DIM, optimizer={"name": "sgd", "lr": LR})
    local = _train(Model(_local_bag(client, table, mode)), _batches(1))
    remote = _train(Model(RemoteEmbeddingBag(client, table, mode=mode)), _batches(1))
    np.testing.assert_allclose(remote, local, rtol=1e-4, atol=1e-6)
    assert remote[-1] != remote[0]


def test_prefetch_pipeline_gives_the_unpipelined_result_when_batches_overlap(client):
    for name in ("plain", "piped"):
        small_table(client, f"pipe_{name}", DIM, optimizer={"name": "sgd", "lr": LR})
    plain = _train(Model(RemoteEmbeddingBag(client, "pipe_plain", mode="sum")), _batches(2, overlap=True))
    piped = _train(Model(RemoteEmbeddingBag(client, "pipe_piped", mode="sum")), _batches(2, overlap=True),
                   prefetch=True)
    np.testing.assert_allclose(piped, plain, rtol=1e-6)
    np.testing.assert_array_equal(client.lookup("pipe_piped", np.arange(40)), client.lookup("pipe_plain",
                                                                                             np.arange(40)))


def test_pinned_prefetch_releases_its_locks_with_the_gradients(client):
    small_table(client, "pipe_pinned", DIM, optimizer={"name": "sgd", "lr": LR})
    bag = RemoteEmbeddingBag(client, "pipe_pinned", mode="sum", pin=True)
    _train(Model(bag), _batches(3, overlap=True), prefetch=True)
    assert client.stats("pipe_pinned")["cache_locked_rows"] == 0


def test_remote_embedding_matches_nn_embedding_forward_and_step(client):
    small_table(client, "emb", DIM, optimizer={"name": "sgd", "lr": 1.0})
    ids = torch.tensor([[3, 1], [3, 7]])
    remote = RemoteEmbedding(client, "emb")
    local = nn.Embedding(ROWS, DIM)
    local.weight.data = torch.from_numpy(client.lookup("emb", np.arange(ROWS), on_miss="init"))
    out = remote(ids)
    np.testing.assert_array_equal(out.detach().numpy(), local(ids).detach().numpy())
    out.sum().backward()
    expected = local.weight.detach().numpy()[[1, 3, 7]] - np.array([[1.0], [2.0], [1.0]], np.float32)
    np.testing.assert_allclose(client.lookup("emb", [1, 3, 7], on_miss="error"), expected, rtol=1e-6)


def test_state_dict_round_trips_rows_and_optimizer_state_through_export_import(client):
    small_table(client, "ckpt", DIM, optimizer={"name": "adagrad", "lr": 0.1})
    bag = RemoteEmbeddingBag(client, "ckpt", mode="sum")
    model = Model(bag)
    _train(model, _batches(4))
    saved = model.state_dict()
    ids = saved["bag.ids"].numpy()
    assert len(ids) > 0 and "head.weight" in saved
    weights, state = client.lookup("ckpt", ids, on_miss="error", with_state=True)
    np.testing.assert_array_equal(saved["bag.weight"].numpy(), weights)
    np.testing.assert_array_equal(saved["bag.optimizer_state"].numpy(), state)

    _train(model, _batches(5))                                  # move on, and add rows
    client.lookup("ckpt", [10_000])
    model.load_state_dict(saved)
    back, back_state = client.lookup("ckpt", ids, on_miss="error", with_state=True)
    np.testing.assert_array_equal(back, weights)
    np.testing.assert_array_equal(back_state, state)
    from kvstore_client import NotFoundError
    with pytest.raises(NotFoundError):                          # replace: rows not in the checkpoint are gone
        client.lookup("ckpt", [10_000], on_miss="error")


# --- the collection: all tables in one request per step, pipelined -------------------------

def _two_feature_batches(seed: int):
    """50 steps of a user id per sample and a bag of item ids per sample, both drawn from few
    ids, so every batch has duplicates and shares rows with the next."""
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        lengths = rng.integers(1, 5, 16)
        items = torch.from_numpy(rng.integers(0, 30, lengths.sum()))
        offsets = torch.from_numpy(np.r_[0, np.cumsum(lengths)[:-1]])
        users = torch.from_numpy(rng.integers(0, 10, (16, 1)))
        yield users, items, offsets, torch.from_numpy(rng.standard_normal((16, 1), dtype=np.float32))


class TwoFeatures(nn.Module):
    def __init__(self, embed):
        super().__init__()
        torch.manual_seed(0)
        self.embed = embed
        self.head = nn.Linear(2 * DIM, 1)

    def forward(self, users, items, offsets, upcoming=None):
        """`upcoming`: the next step's (users, items, offsets), for a collection's forward to name."""
        if isinstance(self.embed, nn.ModuleDict):
            pooled = [self.embed["user"](users), self.embed["item"](items, offsets)]
        else:
            after = None if upcoming is None else {"user": upcoming[0], "item": (upcoming[1], upcoming[2])}
            out = self.embed({"user": users, "item": (items, offsets)}, next_batch=after)
            pooled = [out["user"], out["item"]]
        return self.head(torch.cat(pooled, 1))


def _train_two(model: TwoFeatures, prefetch: bool = False, ahead: str | None = None) -> list[float]:
    """50 steps; `prefetch`: a collection warms step i+2's rows; `ahead` ("after forward", "after
    backward" or "in forward"): it is told each next batch there (`next_batch`, or the forward's
    `next_batch`; at the last step the first batch, which no forward reads)."""
    dense = torch.optim.Adam(model.head.parameters(), lr=LR)
    losses = []
    batches = list(_two_feature_batches(4))
    for step, (users, items, offsets, target) in enumerate(batches):
        if prefetch and step + 2 < len(batches):         # rows of step i+2, warmed on the server
            later = batches[step + 2]
            model.embed.prefetch({"user": later[0], "item": (later[1], later[2])})
        later = batches[(step + 1) % len(batches)]
        loss = ((model(users, items, offsets, later[:3] if ahead == "in forward" else None) - target) ** 2).mean()
        if ahead == "after forward":
            model.embed.next_batch({"user": later[0], "item": (later[1], later[2])})
        dense.zero_grad()
        loss.backward()
        if ahead == "after backward":
            model.embed.next_batch({"user": later[0], "item": (later[1], later[2])})
        dense.step()
        losses.append(loss.item())
    if not isinstance(model.embed, nn.ModuleDict):
        model.embed.flush()
    return losses


def _tables(client, run: str) -> list[tuple[str, str]]:
    names = [(f"{run}_users", "sum"), (f"{run}_items", "mean")]
    for table, _ in names:
        small_table(client, table, DIM, optimizer={"name": "adagrad", "lr": LR})
    return names


def assert_collection_equals_loop(loop_client, collection_client, run: str, pipeline) -> None:
    """Losses and final rows of the collection (on `collection_client`) equal the loop of one
    RemoteEmbeddingBag per table (on `loop_client`), bit for bit."""
    from kvstore_client.collection import Feature, RemoteEmbeddingBagCollection

    plain = _tables(loop_client, f"{run}_plain_{pipeline}")
    together = _tables(loop_client, f"{run}_{pipeline}")
    loop = TwoFeatures(nn.ModuleDict({"user": RemoteEmbeddingBag(loop_client, plain[0][0], mode="sum"),
                                      "item": RemoteEmbeddingBag(loop_client, plain[1][0], mode="mean")}))
    collection = RemoteEmbeddingBagCollection(
        collection_client, [Feature("user", together[0][0], "sum"), Feature("item", together[1][0], "mean")],
        pipeline=bool(pipeline))
    expected = _train_two(loop)
    got = _train_two(TwoFeatures(collection), prefetch=pipeline == "prefetch",
                     ahead={"ahead": "after forward", "early": "in forward"}.get(pipeline))
    assert got == expected and expected[-1] != expected[0]
    for (mine, _), (theirs, _) in zip(together, plain, strict=True):
        np.testing.assert_array_equal(loop_client.lookup(mine, np.arange(30), with_state=True)[1],
                                      loop_client.lookup(theirs, np.arange(30), with_state=True)[1])
        np.testing.assert_array_equal(loop_client.lookup(mine, np.arange(30)),
                                      loop_client.lookup(theirs, np.arange(30)))
    collection.close()


@pytest.mark.parametrize("pipeline", [False, True, "prefetch", "ahead", "early"])
def test_collection_gives_exactly_the_per_table_loop_result(client, pipeline):
    assert_collection_equals_loop(client, client, "coll", pipeline)


def test_collection_features_sharing_a_table_look_it_up_once(client):
    from kvstore_client.collection import Feature, RemoteEmbeddingBagCollection

    small_table(client, "coll_shared", DIM, optimizer={"name": "sgd", "lr": 1.0}, initializer={"kind": "zeros"})
    collection = RemoteEmbeddingBagCollection(client, [Feature("a", "coll_shared", "sum"),
                                                       Feature("b", "coll_shared", "sum")], pipeline=False)
    before = client.stats("coll_shared").get("cache_hits", 0) + client.stats("coll_shared").get("cache_misses", 0)
    out = collection({"a": torch.tensor([[1, 2]]), "b": torch.tensor([[2, 2]])})
    after = client.stats("coll_shared")["cache_hits"] + client.stats("coll_shared").get("cache_misses", 0)
    assert after - before == 2                                    # ids 1 and 2, once each
    (out["a"].sum() + out["b"].sum()).backward()
    collection.flush()
    np.testing.assert_array_equal(client.lookup("coll_shared", [1, 2]), [[-1.0] * DIM, [-3.0] * DIM])
    collection.close()


def test_collection_state_dict_round_trips_every_table(client):
    from kvstore_client.collection import Feature, RemoteEmbeddingBagCollection

    tables = _tables(client, "coll_ckpt")
    collection = RemoteEmbeddingBagCollection(client, [Feature("user", tables[0][0], "sum"),
                                                       Feature("item", tables[1][0], "mean")])
    model = TwoFeatures(collection)
    _train_two(model)
    saved = model.state_dict()
    ids = {tables[0][0]: np.arange(10), tables[1][0]: np.arange(30)}      # every user and item id
    kept = {table: client.lookup(table, ids[table], on_miss="error", with_state=True) for table in ids}
    assert "head.weight" in saved and [len(saved[f"embed.{table}.ids"]) for table in ids] == [10, 30]
    _train_two(model)                                              # move on
    model.load_state_dict(saved)
    for table, (weights, state) in kept.items():
        back, back_state = client.lookup(table, ids[table], on_miss="error", with_state=True)
        np.testing.assert_array_equal(back, weights)
        np.testing.assert_array_equal(back_state, state)
    collection.close()


def test_collection_keeps_every_gradient_of_two_forwards_before_one_backward(client):
    from kvstore_client.collection import Feature, RemoteEmbeddingBagCollection

    small_table(client, "coll_accumulate", DIM, optimizer={"name": "sgd", "lr": 1.0}, initializer={"kind": "zeros"})
    collection = RemoteEmbeddingBagCollection(client, [Feature("a", "coll_accumulate", "sum")])
    first = collection({"a": torch.tensor([[1, 2]])})["a"].sum()
    second = collection({"a": torch.tensor([[2, 3]])})["a"].sum()       # micro-batches, one backward
    (first + second).backward()
    collection.flush()
    np.testing.assert_array_equal(client.lookup("coll_accumulate", [1, 2, 3]),
                                  [[-1.0] * DIM, [-2.0] * DIM, [-1.0] * DIM])
    collection.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_tables_train_under_autocast_as_the_per_table_loop(client, dtype):
    """A model under `torch.autocast` (bfloat16 on the CPU) trains bfloat16 and float16 tables
    through the collection, the next batch named in the forward, to the losses and rows of one
    RemoteEmbeddingBag per table: rows reach the model as float32, the dense layer runs in
    bfloat16, gradients go back as float32 and each table keeps its rows in its own dtype."""
    from kvstore_client.collection import Feature, RemoteEmbeddingBagCollection

    names = {run: [f"autocast_{dtype}_{run}_users", f"autocast_{dtype}_{run}_items"] for run in ("loop", "coll")}
    for table in names["loop"] + names["coll"]:
        small_table(client, table, DIM, dtype=dtype, optimizer={"name": "adagrad", "lr": LR})
    before = client.lookup(names["coll"][1], np.arange(30), on_miss="init")
    client.lookup(names["loop"][1], np.arange(30), on_miss="init")
    loop = TwoFeatures(nn.ModuleDict({"user": RemoteEmbeddingBag(client, names["loop"][0], mode="sum"),
                                      "item": RemoteEmbeddingBag(client, names["loop"][1], mode="mean")}))
    collection = RemoteEmbeddingBagCollection(client, [Feature("user", names["coll"][0], "sum"),
                                                       Feature("item", names["coll"][1], "mean")])
    model = TwoFeatures(collection)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _train_two(loop)
        got = _train_two(model, ahead="in forward")
        with torch.no_grad():
            assert model.head(torch.zeros(1, 2 * DIM)).dtype == torch.bfloat16     # autocast is on
    assert got == expected and expected[-1] != expected[0]
    for mine, theirs in zip(names["coll"], names["loop"], strict=True):
        rows = client.lookup(mine, np.arange(30))
        assert str(rows.dtype) == dtype
        np.testing.assert_array_equal(rows, client.lookup(theirs, np.arange(30)))
    assert not np.array_equal(client.lookup(names["coll"][1], np.arange(30)), before)
    collection.close()
