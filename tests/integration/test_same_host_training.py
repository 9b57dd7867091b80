"""The training collection over the same-host path: exactly the plain loop's losses and rows."""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from kvstore_client import KVStoreClient  # noqa: E402
from kvstore_client.collection import Feature, RemoteEmbeddingBagCollection  # noqa: E402
from kvstore_client.torch_modules import RemoteEmbeddingBag  # noqa: E402
from torch import nn  # noqa: E402

from .test_torch_modules import TwoFeatures, _tables, _train_two  # noqa: E402


@pytest.mark.parametrize("pipeline", [False, True, "prefetch"])
def test_collection_over_shared_memory_equals_the_plain_network_loop(server, pipeline):
    with KVStoreClient(server.address, same_host=True) as shm, KVStoreClient(server.address, same_host=False) as net:
        plain = _tables(net, f"shm_plain_{pipeline}")
        together = _tables(net, f"shm_coll_{pipeline}")
        loop = TwoFeatures(nn.ModuleDict({"user": RemoteEmbeddingBag(net, plain[0][0], mode="sum"),
                                          "item": RemoteEmbeddingBag(net, plain[1][0], mode="mean")}))
        collection = RemoteEmbeddingBagCollection(
            shm, [Feature("user", together[0][0], "sum"), Feature("item", together[1][0], "mean")],
            pipeline=bool(pipeline))
        expected = _train_two(loop)
        got = _train_two(TwoFeatures(collection), prefetch=pipeline == "prefetch")
        assert shm.same_host.active and not net.same_host.active
        assert got == expected and expected[-1] != expected[0]
        for (mine, _), (theirs, _) in zip(together, plain, strict=True):
            for with_state in (False, True):
                left = net.lookup(mine, np.arange(30), with_state=with_state)
                right = net.lookup(theirs, np.arange(30), with_state=with_state)
                assert all(np.array_equal(a, b) for a, b in zip(left, right, strict=True))
        collection.close()


def test_a_closed_stream_retires_the_segments_of_unanswered_steps(server):
    with KVStoreClient(server.address, same_host=True) as shm:
        from kvstore_client.training_stream import TrainingStream

        shm.create_table("shm_stream", 8)
        stream = TrainingStream(shm)
        first = stream.send(lookups={"shm_stream": np.arange(10)})
        _, rows = first.result()
        assert rows["shm_stream"].shape == (10, 8)
        reused = {s.name for s in shm.same_host.pool._free}
        pending = stream.send(lookups={"shm_stream": np.arange(20)})
        held = pending.segment.name
        stream.close()
        assert held in reused and pending.error is not None
        assert held not in {s.name for s in shm.same_host.pool._free} and not os.path.exists(f"/dev/shm/{held}")
