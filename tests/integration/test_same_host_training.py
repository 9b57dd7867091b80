"""The training collection over the same-host path: exactly the plain loop's losses and rows."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from kvstore_client import KVStoreClient  # noqa: E402

from .test_torch_modules import assert_collection_equals_loop  # noqa: E402


@pytest.mark.parametrize("pipeline", [False, True, "prefetch", "ahead", "early"])
def test_collection_over_shared_memory_equals_the_plain_network_loop(server, pipeline):
    with KVStoreClient(server.address, same_host=True) as shm, KVStoreClient(server.address) as net:
        assert_collection_equals_loop(net, shm, "shm_coll", pipeline)
        pool = shm.same_host.pool
        assert shm.same_host.active and not net.same_host.active
        assert pool.lent() == 0 and pool._free                                     # every segment back


def test_a_closed_stream_retires_the_segments_of_unanswered_steps(server):
    with KVStoreClient(server.address, same_host=True) as shm:
        from kvstore_client.training_stream import TrainingStream

        shm.create_table("shm_stream", 8)
        stream = TrainingStream(shm)
        first = stream.send(lookups={"shm_stream": np.arange(10)})
        first_segment = first.segment.name
        _, rows = first.result()
        assert rows["shm_stream"].shape == (10, 8)       # over the segment, which it owns
        del rows, first
        gc.collect()                                     # let go: the segment is the pool's again
        pending = stream.send(lookups={"shm_stream": np.arange(20)})
        held = pending.segment.name
        stream.close()
        assert held == first_segment and pending.error is not None
        assert held not in {s.name for s in shm.same_host.pool._free} and not os.path.exists(f"/dev/shm/{held}")


def test_looked_up_rows_of_a_step_stay_as_read_while_later_steps_run(server):
    """A step's rows are arrays over its segment (no copy): later steps, which change those rows on
    the server and write newer rows, never reuse a segment whose rows are still held."""
    from kvstore_client.training_stream import TrainingStream

    with KVStoreClient(server.address, same_host=True) as shm, KVStoreClient(server.address) as net:
        shm.create_table("shm_lent", 8, optimizer={"name": "sgd", "lr": 0.5})
        stream = TrainingStream(shm)
        ids = np.arange(32)
        _, first = stream.send(lookups={"shm_lent": ids}).result()
        as_read = first["shm_lent"].copy()
        for _ in range(10):
            grads = np.ones((len(ids), 8), np.float32)
            _, later = stream.send(gradients={"shm_lent": (ids, grads)}, lookups={"shm_lent": ids}).result()
        stream.close()
        assert np.array_equal(first["shm_lent"], as_read)
        assert np.array_equal(later["shm_lent"], net.lookup("shm_lent", ids))
        assert np.allclose(as_read - later["shm_lent"], 0.5 * 10)       # ten SGD steps of 0.5 * 1 apart


def test_steps_whose_rows_are_all_kept_are_lent_up_to_a_few_segments_then_copied(server):
    from kvstore_client.shared_memory import MAX_LENT
    from kvstore_client.training_stream import TrainingStream

    with KVStoreClient(server.address, same_host=True) as shm, KVStoreClient(server.address) as net:
        shm.create_table("shm_kept", 8)
        stream = TrainingStream(shm)
        kept = [(ids, stream.send(lookups={"shm_kept": ids}).result()[1]["shm_kept"])
                for ids in (np.arange(i, i + 16) for i in range(0, 16 * (MAX_LENT + 8), 16))]
        assert shm.same_host.pool.lent() == MAX_LENT          # the rest were copies
        stream.close()
        for ids, rows in kept:
            assert rows.flags.writeable and np.array_equal(rows, net.lookup("shm_kept", ids))


def test_closing_the_collection_lets_go_of_a_next_batch_nobody_read(server):
    """A batch named by next_batch whose forward never comes (the last step of a loop) holds its
    answered rows over a shared-memory segment; close() gives the segment back."""
    from kvstore_client.collection import Feature, RemoteEmbeddingBagCollection

    with KVStoreClient(server.address, same_host=True) as shm:
        shm.create_table("shm_unread", 8)
        collection = RemoteEmbeddingBagCollection(shm, [Feature("a", "shm_unread", "sum")])
        collection({"a": torch.tensor([[1, 2]])})["a"].sum().backward()
        collection.next_batch({"a": torch.tensor([[3, 4]])})
        collection.flush()
        lent = shm.same_host.pool.lent()
        collection.close()
        assert (lent, shm.same_host.pool.lent()) == (1, 0)
