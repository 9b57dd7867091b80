"""Hostile same-host requests against a real segment: names, offsets, sizes, shapes and dtypes that
do not fit are INVALID_ARGUMENT naming the field; the server stays up and a canary table keeps its rows."""
from __future__ import annotations

import secrets
from multiprocessing import shared_memory

import grpc
import numpy as np
import pytest
from kvstore_client import KVStoreClient
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc

from .conftest import random_rows, small_table

DIM = 8
CANARY = "shm_canary"
CANARY_IDS = np.array([1, 2, 3, 4], np.int64)
SEGMENT_BYTES = 1 << 16
U64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def segment():
    """A real segment, attached, holding two canary ids at offset 64 and room for rows after."""
    block = shared_memory.SharedMemory(name="kvstore-" + secrets.token_hex(16), create=True, size=SEGMENT_BYTES)
    np.ndarray((2,), np.int64, buffer=block.buf, offset=64)[:] = CANARY_IDS[:2]
    yield block
    block.close()
    block.unlink()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.EmbeddingStoreStub(channel)


@pytest.fixture(scope="module")
def canary(client):
    small_table(client, CANARY, DIM, optimizer={"name": "sgd", "lr": 1.0})
    rows = random_rows(len(CANARY_IDS), DIM, seed=9)
    client.update(CANARY, CANARY_IDS, rows)
    return rows


def array(dtype="int64", shape=(2,), offset=64, device_buffer="") -> pb.SharedArray:
    return pb.SharedArray(dtype=dtype, shape=list(shape), offset=offset, device_buffer=device_buffer)


UNATTACHED_BUFFER = "kvstore-" + "b" * 32


ROWS_AT = 1024
LOOKUPS = {   # name -> (SharedLookupRequest fields replacing the good ones, the field the message must start with)
    "ids_offset_past_the_end": ({"ids": array(offset=SEGMENT_BYTES)}, "ids"),
    "ids_offset_wraps_64_bits": ({"ids": array(offset=U64 - 7)}, "ids"),
    "ids_straddle_the_end": ({"ids": array(offset=SEGMENT_BYTES - 8)}, "ids"),
    "ids_misaligned": ({"ids": array(offset=65)}, "ids.offset"),
    "ids_huge_shape": ({"ids": array(shape=(1 << 62,))}, "ids"),
    "ids_shape_past_int64": ({"ids": array(shape=(-1,))}, "ids.shape"),
    "ids_rank_2": ({"ids": array(shape=(2, 1))}, "ids.shape"),
    "ids_float": ({"ids": array(dtype="float64")}, "ids.dtype"),
    "ids_unknown_dtype": ({"ids": array(dtype="complex128")}, "ids.dtype"),
    "ids_missing": ({"ids": None}, "ids"),
    "rows_past_the_end": ({"weights": array("float32", (2, DIM), SEGMENT_BYTES - 32)}, "weights"),
    "rows_offset_wraps": ({"weights": array("float32", (2, DIM), U64 - 3)}, "weights"),
    "rows_wrong_dim": ({"weights": array("float32", (2, DIM + 1), ROWS_AT)}, "weights.shape"),
    "rows_wrong_count": ({"weights": array("float32", (3, DIM), ROWS_AT)}, "weights.shape"),
    "rows_wrong_dtype": ({"weights": array("float16", (2, DIM), ROWS_AT)}, "weights.dtype"),
    "state_wrong_width": ({"state": array("float32", (2, 99), ROWS_AT + 4096)}, "state.shape"),
    "segment_path": ({"segment": "../../../etc/passwd"}, "segment"),
    "segment_uppercase_hex": ({"segment": "kvstore-" + "ABCDEF01" * 4}, "segment"),
    "segment_33_hex": ({"segment": "kvstore-" + "a" * 33}, "segment"),
    "segment_absent": ({"segment": "kvstore-" + "f" * 32}, "segment"),
    "segment_nul": ({"segment": "kvstore-\x00" + "a" * 31}, "segment"),
    "ids_in_a_gpu_buffer": ({"ids": array(device_buffer=UNATTACHED_BUFFER)}, "ids.device_buffer"),
    "rows_to_an_unattached_gpu_buffer": ({"weights": array("float32", (2, DIM), 0, UNATTACHED_BUFFER)},
                                         "weights.device_buffer"),
    "state_beside_rows_to_a_gpu_buffer": ({"weights": array("float32", (2, DIM), 0, UNATTACHED_BUFFER),
                                           "state": array("float32", (2, 1), ROWS_AT)}, "state"),
}


def good_lookup(segment) -> dict:
    return {"table": CANARY, "segment": segment.name, "ids": array(),
            "weights": array("float32", (2, DIM), ROWS_AT), "on_miss": pb.ON_MISS_ZEROS}


def assert_harmless(error: grpc.RpcError, field: str, server, client, canary) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(field), error.details()
    assert server.alive()
    assert np.array_equal(client.lookup(CANARY, CANARY_IDS, on_miss="zeros"), canary)


def test_a_good_shared_lookup_writes_the_rows(stub, segment, canary):
    assert stub.AttachSegment(pb.AttachSegmentRequest(segment=segment.name, token=bytes(segment.buf[:16]))).attached
    assert stub.SharedLookup(pb.SharedLookupRequest(**good_lookup(segment))).rows == 2
    assert np.array_equal(np.ndarray((2, DIM), np.float32, buffer=segment.buf, offset=ROWS_AT), canary[:2])


@pytest.mark.parametrize("case", sorted(LOOKUPS))
def test_hostile_shared_lookup_is_invalid_argument_and_harmless(stub, segment, server, client, canary, case):
    fields, field = LOOKUPS[case]
    request = {**good_lookup(segment), **fields}
    with pytest.raises(grpc.RpcError) as caught:
        stub.SharedLookup(pb.SharedLookupRequest(**{k: v for k, v in request.items() if v is not None}))
    assert_harmless(caught.value, field, server, client, canary)


GRADIENTS = {
    "grads_past_the_end": ({"grads": array("float32", (2, DIM), SEGMENT_BYTES - 8)}, "grads"),
    "grads_offset_wraps": ({"grads": array("float32", (2, DIM), U64 - 3)}, "grads"),
    "grads_int64": ({"grads": array("int64", (2, DIM), ROWS_AT)}, "grads.dtype"),
    "grads_wrong_dim": ({"grads": array("float32", (2, 3), ROWS_AT)}, "grads.shape"),
    "scores_wrong_count": ({"scores": array("float32", (5,), ROWS_AT + 4096)}, "scores.shape"),
    "grads_nan": ({"grads": array("float32", (2, DIM), ROWS_AT + 8192)}, "grads"),
    "grads_from_an_unattached_gpu_buffer": ({"grads": array("float32", (2, DIM), 0, UNATTACHED_BUFFER)},
                                            "grads.device_buffer"),
    "scores_in_a_gpu_buffer": ({"scores": array("float32", (2,), 0, UNATTACHED_BUFFER)}, "scores.device_buffer"),
}


@pytest.mark.parametrize("case", sorted(GRADIENTS))
def test_hostile_shared_gradients_are_invalid_argument_and_change_nothing(stub, segment, server, client, canary,
                                                                          case):
    np.ndarray((2, DIM), np.float32, buffer=segment.buf, offset=ROWS_AT + 8192)[:] = np.nan
    fields, field = GRADIENTS[case]
    request = {"table": CANARY, "segment": segment.name, "ids": array(),
               "grads": array("float32", (2, DIM), ROWS_AT), **fields}
    with pytest.raises(grpc.RpcError) as caught:
        stub.SharedApplyGradients(pb.SharedApplyGradientsRequest(**request))
    assert_harmless(caught.value, field, server, client, canary)


def test_hostile_shared_update_is_invalid_argument_and_changes_nothing(stub, segment, server, client, canary):
    request = pb.SharedUpdateRequest(table=CANARY, segment=segment.name, ids=array(),
                                     weights=array("float32", (2, DIM), U64 - 3))
    with pytest.raises(grpc.RpcError) as caught:
        stub.SharedUpdate(request)
    assert_harmless(caught.value, "weights", server, client, canary)


def test_attach_with_the_wrong_token_or_an_absent_segment_answers_no(stub, segment):
    wrong = stub.AttachSegment(pb.AttachSegmentRequest(segment=segment.name, token=b"x" * 16))
    absent = stub.AttachSegment(pb.AttachSegmentRequest(segment="kvstore-" + "e" * 32, token=b"x" * 16))
    assert not wrong.attached and "token" in wrong.reason
    assert not absent.attached and "no segment" in absent.reason


def test_clients_still_work_after_the_hostile_requests(server, canary):
    with KVStoreClient(server.address, same_host=True) as fresh:
        assert np.array_equal(fresh.lookup(CANARY, CANARY_IDS), canary)


TRAIN = {    # name -> (the step's TableRows fields, whether it names the segment, the field the message starts with)
    "grads_past_the_end": ({"gradients": [{"shared_ids": array(), "shared_values": array(
        "float32", (2, DIM), SEGMENT_BYTES - 16)}]}, True, "gradients[0].shared_values"),
    "grads_nan": ({"gradients": [{"shared_ids": array(), "shared_values": array(
        "float32", (2, DIM), ROWS_AT + 8192)}]}, True, "grads"),           # the store's check, as on the wire
    "ids_without_segment": ({"gradients": [{"shared_ids": array(), "shared_values": array(
        "float32", (2, DIM), ROWS_AT)}]}, False, "gradients[0].shared_ids"),
    "rows_wrong_dtype": ({"gradients": [{"shared_ids": array(), "shared_values": array("float32", (2, DIM), ROWS_AT)}],
                          "lookups": [{"shared_ids": array(), "shared_values": array("float64", (2, DIM), ROWS_AT)}]},
                         True, "lookups[0].shared_values.dtype"),
    "rows_offset_wraps": ({"gradients": [{"shared_ids": array(), "shared_values": array("float32", (2, DIM), ROWS_AT)}],
                           "lookups": [{"shared_ids": array(), "shared_values": array("float32", (2, DIM), U64 - 3)}]},
                          True, "lookups[0].shared_values"),
}


@pytest.mark.parametrize("case", sorted(TRAIN))
def test_hostile_train_step_is_invalid_argument_and_applies_nothing(stub, segment, server, client, canary, case):
    np.ndarray((2, DIM), np.float32, buffer=segment.buf, offset=ROWS_AT + 8192)[:] = np.nan
    np.ndarray((2, DIM), np.float32, buffer=segment.buf, offset=ROWS_AT)[:] = 1.0
    pieces, named, field = TRAIN[case]
    request = pb.TrainRequest(segment=segment.name if named else "", **{
        kind: [pb.TableRows(table=CANARY, **fields) for fields in rows] for kind, rows in pieces.items()})
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Train(iter([request])))
    assert_harmless(caught.value, field, server, client, canary)


def test_a_gpu_buffer_the_server_cannot_open_answers_no_with_the_reason(stub):
    """Where the server has no CuPy or no GPU (CI), or the handle is not one the driver knows, the
    client is told why and keeps its rows in the segment."""
    answer = stub.AttachDeviceBuffer(pb.AttachDeviceBufferRequest(
        buffer=UNATTACHED_BUFFER, handle=b"h" * 64, size=1 << 20, device_uuid=b"u" * 16, token=b"t" * 16))
    assert not answer.attached
    assert any(word in answer.reason for word in ("CuPy", "CUDA", "GPU")), answer.reason


@pytest.mark.parametrize("fields, field", [
    ({"buffer": "../etc/passwd"}, "buffer"),
    ({"handle": b"h" * 63}, "handle"),
    ({"device_uuid": b""}, "device_uuid"),
    ({"token": b"t" * 17}, "token"),
    ({"size": 8}, "size"),
])
def test_a_malformed_gpu_buffer_attach_is_invalid_argument(stub, server, client, canary, fields, field):
    request = {"buffer": UNATTACHED_BUFFER, "handle": b"h" * 64, "size": 1 << 20, "device_uuid": b"u" * 16,
               "token": b"t" * 16, **fields}
    with pytest.raises(grpc.RpcError) as caught:
        stub.AttachDeviceBuffer(pb.AttachDeviceBufferRequest(**request))
    assert_harmless(caught.value, field, server, client, canary)
