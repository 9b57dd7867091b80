"""The training collection over the same-host path: exactly the plain loop's losses and rows."""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from kvstore_client import KVStoreClient  # noqa: E402

from .test_torch_modules import assert_collection_equals_loop  # noqa: E402


@pytest.mark.parametrize("pipeline", [False, True, "prefetch"])
def test_collection_over_shared_memory_equals_the_plain_network_loop(server, pipeline):
    with KVStoreClient(server.address, same_host=True) as shm, KVStoreClient(server.address) as net:
        assert_collection_equals_loop(net, shm, "shm_coll", pipeline)
        assert shm.same_host.active and shm.same_host.pool._free and not net.same_host.active


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
