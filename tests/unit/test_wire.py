"""The lookup response fast paths speak exactly the protobuf wire format."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from kvstore_proto.tensors import WireError, decode_lookup_response, encode_lookup_response, encode_tensor
from kvstore_proto.v1 import kvstore_pb2 as pb

CASES = [
    (np.arange(15, dtype=np.float32).reshape(5, 3), None),
    (np.zeros((0, 4), np.float16), np.zeros((0, 9), np.float32)),
    (np.linspace(-3, 3, 300 * 200).astype(ml_dtypes.bfloat16).reshape(300, 200),
     np.linspace(0, 1, 300).astype(np.float32).reshape(300, 1)),
    (np.arange(4, dtype=">f8").reshape(2, 2), None),                   # big-endian input goes out little-endian
    (np.arange(200 * 128, dtype=np.float32).reshape(200, 128)[::2], None),   # not contiguous
]


def protobuf_bytes(weights, state) -> bytes:
    return pb.LookupResponse(weights=encode_tensor(weights),
                             state=None if state is None else encode_tensor(state)).SerializeToString()


@pytest.mark.parametrize("weights,state", CASES)
def test_encoded_response_is_byte_identical_to_protobuf(weights, state):
    assert encode_lookup_response(weights, state) == protobuf_bytes(weights, state)


@pytest.mark.parametrize("weights,state", CASES)
def test_decoded_response_equals_what_protobuf_parses(weights, state):
    blob = protobuf_bytes(weights, state)
    got_weights, got_state = decode_lookup_response(blob)
    parsed = pb.LookupResponse.FromString(blob)
    assert got_weights.shape == tuple(parsed.weights.shape) and got_weights.tobytes() == parsed.weights.data
    np.testing.assert_array_equal(got_weights, weights.astype(got_weights.dtype))
    if state is None:
        assert got_state is None
    else:
        np.testing.assert_array_equal(got_state, state)


def test_decoder_skips_unknown_fields_of_a_newer_server():
    weights = np.ones((2, 3), np.float32)
    message = pb.LookupResponse(weights=encode_tensor(weights))
    blob = message.SerializeToString() + b"\x18\x07" + b"\x25\x00\x00\x00\x00"   # field 3 varint, field 4 fixed32
    np.testing.assert_array_equal(decode_lookup_response(blob)[0], weights)


@pytest.mark.parametrize("blob,names", [
    (protobuf_bytes(np.ones((4, 2), np.float32), None)[:-3], "runs past the end"),
    (pb.LookupResponse(weights=pb.Tensor(dtype="int8", shape=[1], data=b"\0")).SerializeToString(),
     "weights.dtype"),
    (pb.LookupResponse(weights=pb.Tensor(dtype="float32", shape=[4, 8], data=b"\0" * 100)).SerializeToString(),
     "weights.data"),
    (pb.LookupResponse(state=pb.Tensor(dtype="float32", shape=[-1, 2], data=b"")).SerializeToString(),
     "state.shape"),
    (b"\x0a\xff", "truncated"),
])
def test_malformed_responses_raise_wire_errors_naming_the_field(blob, names):
    with pytest.raises(WireError, match=names):
        decode_lookup_response(blob)


def test_the_server_allocator_keeps_freed_memory_on_glibc():
    import platform

    from kvstore_server.allocator import keep_freed_memory

    libc = platform.libc_ver()[0]
    assert keep_freed_memory() is (libc == "glibc")
