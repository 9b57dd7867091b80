"""ApplyGradients requests written as bytes parse as the message the generated code would build."""
from __future__ import annotations

import numpy as np
import pytest
from kvstore_client import InvalidArgumentError
from kvstore_client.gradient_messages import GradientChunk, serialize
from kvstore_proto.tensors import decode_ids, decode_tensor
from kvstore_proto.v1 import kvstore_pb2 as pb


@pytest.mark.parametrize("owner, scores, last", [("", False, False), ("lease-1", True, True)])
def test_a_gradient_chunk_parses_as_the_request_it_stands_for(owner, scores, last):
    rng = np.random.default_rng(0)
    ids = rng.integers(-2**63, 2**63 - 1, 300, dtype=np.int64)
    grads = rng.standard_normal((300, 16)).astype(np.float32)
    score_array = rng.random(300, dtype=np.float32) if scores else None
    chunk = GradientChunk("tabellé", ids, grads, owner, "key-7", score_array)
    chunk.last = last
    request = pb.ApplyGradientsRequest.FromString(serialize(chunk))
    assert (request.table, request.owner, request.idempotency_key, request.last) == ("tabellé", owner, "key-7", last)
    np.testing.assert_array_equal(decode_ids(request.ids), ids)
    np.testing.assert_array_equal(decode_tensor(request.grads, "grads"), grads)
    assert request.HasField("scores") == scores
    if scores:
        np.testing.assert_array_equal(decode_tensor(request.scores, "scores"), score_array)


def test_an_empty_chunk_is_a_valid_request():
    chunk = GradientChunk("t", np.arange(0), np.zeros((0, 4)), "", "k")
    request = pb.ApplyGradientsRequest.FromString(serialize(chunk))
    assert request.table == "t" and request.ids == b"" and tuple(request.grads.shape) == (0, 4)


def test_a_gradient_dtype_the_wire_lacks_is_invalid_argument():
    with pytest.raises(InvalidArgumentError, match="grads"):
        GradientChunk("t", np.arange(2), np.zeros((2, 4), np.complex64), "", "k")
