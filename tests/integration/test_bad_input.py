"""Bad input through the real server: the right status code, a message naming the field,
the server stays up and stored rows are unchanged."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from kvstore_client import (
    AlreadyExistsError,
    InvalidArgumentError,
    KVStoreClient,
    NotFoundError,
    ResourceExhaustedError,
)
from kvstore_proto.tensors import encode_ids, encode_tensor
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc

from .conftest import completed, random_rows, small_table

REF_IDS = np.array([1, 2, 3, -7], dtype=np.int64)
REF_ROWS = random_rows(len(REF_IDS), 8, seed=42)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.EmbeddingStoreStub(channel)


@pytest.fixture(scope="module", autouse=True)
def reference(client):
    small_table(client, "ref")
    client.update("ref", REF_IDS, REF_ROWS)


@pytest.fixture(autouse=True)
def unchanged(server, client, reference):
    """After every test: the server is up and the reference rows are exactly as written."""
    yield
    assert server.alive()
    np.testing.assert_array_equal(client.lookup("ref", REF_IDS, on_miss="error"), REF_ROWS)
    assert client.stats("ref")["rows_updated"] == len(REF_IDS)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    if args and not isinstance(args[0], Message):               # a client stream: its final chunk marked last
        args = (iter(completed(args[0])), *args[1:])
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, timeout=10, **kwargs)
        if not isinstance(result, pb.UpdateResponse | pb.DeleteResponse) and hasattr(result, "__iter__"):
            list(result)
    return caught.value


def update_chunk(ids, weights, table="ref", **kwargs) -> pb.UpdateRequest:
    return pb.UpdateRequest(table=table, ids=encode_ids(np.asarray(ids)), weights=encode_tensor(weights), **kwargs)


@pytest.mark.parametrize("call", ["lookup", "update", "delete", "describe_table", "stats", "drop_table"])
def test_unknown_table_is_not_found_naming_table(client, call):
    args = {"lookup": ([1],), "update": ([1], np.zeros((1, 8), np.float32)), "delete": ([1],)}.get(call, ())
    with pytest.raises(NotFoundError) as caught:
        getattr(client, call)("no_such_table", *args)
    assert "table" in caught.value.message and caught.value.reason == "table_not_found"


def test_duplicate_create_is_already_exists(client):
    with pytest.raises(AlreadyExistsError) as caught:
        small_table(client, "ref", dim=4)
    assert "name" in caught.value.message
    assert client.describe_table("ref")["dim"] == 8


@pytest.mark.parametrize("name", ["", "bad name", "-leading", "x" * 200, "semi;colon"])
def test_invalid_table_name_is_invalid_argument(client, name):
    with pytest.raises(InvalidArgumentError) as caught:
        client.create_table(name, 8)
    assert caught.value.message.startswith("name")


def test_invalid_table_name_in_a_row_call_names_table(client):
    with pytest.raises(InvalidArgumentError) as caught:
        client.stats("bad name")
    assert caught.value.message.startswith("table")


@pytest.mark.parametrize("dim", [0, -1, 10**7])
def test_bad_dim_is_invalid_argument(client, dim):
    with pytest.raises(InvalidArgumentError) as caught:
        client.create_table(f"dim_{abs(dim)}", dim)
    assert caught.value.message.startswith("dim")
    assert f"dim_{abs(dim)}" not in client.list_tables()


@pytest.mark.parametrize("dim", [10**10, 2.5, "8"])
def test_dim_the_wire_cannot_carry_is_rejected_by_the_client(client, dim):
    with pytest.raises(InvalidArgumentError) as caught:
        client.create_table("dim_local", dim)
    assert caught.value.message.startswith("dim")


def test_unsupported_dtype_is_invalid_argument(client):
    with pytest.raises(InvalidArgumentError) as caught:
        client.create_table("int_table", 8, dtype="int8")
    assert caught.value.message.startswith("dtype")


@pytest.mark.parametrize("field, value", [("optimizer", {"name": "rmsprop"}), ("initializer", {"kind": "magic"}),
                                          ("cache", {"rows": 100, "ways": 32}), ("cache", {"policy": "fifo"})])
def test_bad_nested_config_names_the_field(client, field, value):
    with pytest.raises(InvalidArgumentError) as caught:
        client.create_table("nested_bad", 8, **{field: value})
    assert caught.value.message.startswith(f"{field}.") or caught.value.message.startswith(field)


@pytest.mark.parametrize("weights, field", [
    (np.zeros((3, 8), np.float32), "weights"),      # 3 rows for 4 ids
    (np.zeros((4, 7), np.float32), "weights"),      # wrong dim
    (np.zeros((4 * 8,), np.float32), "weights"),    # flat
])
def test_weights_not_matching_ids_by_dim_is_invalid_argument(stub, weights, field):
    error = rpc_error(stub.Update, iter([update_chunk(REF_IDS, weights)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(field)


def test_weights_bytes_not_matching_shape_is_invalid_argument(stub):
    tensor = pb.Tensor(dtype="float32", shape=[4, 8], data=b"\0" * 100)
    error = rpc_error(stub.Update, iter([pb.UpdateRequest(table="ref", ids=encode_ids(REF_IDS), weights=tensor)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("weights.data")
    assert dict(error.trailing_metadata())["kvstore-reason"] == "invalid_argument"


def test_client_checks_shapes_locally_too(client):
    with pytest.raises(InvalidArgumentError) as caught:
        client.update("ref", REF_IDS, np.zeros((3, 8), np.float32))
    assert caught.value.message.startswith("weights")
    with pytest.raises(InvalidArgumentError):
        client.lookup("ref", np.array([[1, 2]]))


@pytest.mark.parametrize("rpc", ["Lookup", "Update", "Delete"])
def test_id_bytes_not_a_multiple_of_8_is_invalid_argument(stub, rpc):
    ids = b"\1" * 12
    request = {
        "Lookup": pb.LookupRequest(table="ref", ids=ids),
        "Update": pb.UpdateRequest(table="ref", ids=ids, weights=encode_tensor(np.zeros((1, 8), np.float32))),
        "Delete": pb.DeleteRequest(table="ref", ids=ids),
    }[rpc]
    error = rpc_error(getattr(stub, rpc), iter([request]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("ids")


def test_unknown_on_miss_value_is_invalid_argument(stub, client):
    error = rpc_error(stub.Lookup, iter([pb.LookupRequest(table="ref", ids=encode_ids(REF_IDS), on_miss=99)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("on_miss")
    with pytest.raises(InvalidArgumentError) as caught:
        client.lookup("ref", REF_IDS, on_miss="sometimes")
    assert caught.value.message.startswith("on_miss")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_update_is_rejected(client, bad):
    weights = REF_ROWS.copy()
    weights[2, 3] = bad
    with pytest.raises(InvalidArgumentError) as caught:
        client.update("ref", REF_IDS, weights)
    assert caught.value.message.startswith("weights")


def test_nonfinite_update_is_kept_when_the_table_allows_it(client):
    small_table(client, "nonfinite", dim=2, allow_nonfinite=True)
    weights = np.array([[np.nan, np.inf]], np.float32)
    client.update("nonfinite", [5], weights)
    np.testing.assert_array_equal(client.lookup("nonfinite", [5], on_miss="error"), weights)


def test_bad_second_update_chunk_changes_nothing(stub):
    good = update_chunk(REF_IDS[:2], np.ones((2, 8), np.float32))
    bad = update_chunk(REF_IDS[2:], np.full((2, 8), np.nan, np.float32))
    error = rpc_error(stub.Update, iter([good, bad]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("weights")


def test_update_chunks_naming_different_tables_are_invalid_argument(stub, client):
    small_table(client, "other")
    chunks = [update_chunk(REF_IDS[:2], np.ones((2, 8), np.float32)),
              update_chunk(REF_IDS[2:], np.ones((2, 8), np.float32), table="other")]
    error = rpc_error(stub.Update, iter(chunks))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("table")


@pytest.mark.parametrize("bad_chunk, code", [
    (pb.LookupRequest(table="ref", ids=encode_ids(np.array([404])), on_miss=pb.ON_MISS_ERROR),
     grpc.StatusCode.NOT_FOUND),
    (pb.LookupRequest(table="ref", ids=b"\0" * 5), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.LookupRequest(table="gone", ids=encode_ids(np.array([1]))), grpc.StatusCode.NOT_FOUND),
])
def test_error_inside_the_lookup_stream_reaches_the_client_with_its_code(stub, bad_chunk, code):
    good = pb.LookupRequest(table="ref", ids=encode_ids(REF_IDS), on_miss=pb.ON_MISS_ERROR)
    responses = stub.Lookup(iter([good, bad_chunk, good]), timeout=10)
    first = next(responses)
    assert first.weights.shape == [4, 8]
    with pytest.raises(grpc.RpcError) as caught:
        next(responses)
    assert caught.value.code() == code
    assert caught.value.details().startswith(("ids", "table"))


def test_lookup_through_the_client_fails_on_a_later_chunk(client):
    ids = np.concatenate([np.tile(REF_IDS, 300), [12345]])   # the missing id sits in the last chunk
    with KVStoreClient(client.address, chunk_bytes=1024) as tiny:
        with pytest.raises(NotFoundError) as caught:
            tiny.lookup("ref", ids, on_miss="error")
    assert caught.value.reason == "row_not_found"
    with pytest.raises(NotFoundError):
        client.lookup("ref", [12345], on_miss="error")


# --- limits, on a server started with small ones -------------------------------------


@pytest.fixture(scope="module")
def limited(start_server, tmp_path_factory):
    config = tmp_path_factory.mktemp("limits") / "server.yaml"
    config.write_text("max_request_rows: 100\nmax_chunk_rows: 50\nmax_message_bytes: 65536\n"
                      "rocksdb:\n  block_cache_bytes: 8388608\n")
    server = start_server("--config", str(config))
    with KVStoreClient(server.address, max_message_bytes=65536, chunk_bytes=1024) as client:
        small_table(client, "lim")
        client.update("lim", np.arange(40), random_rows(40, 8))
        with grpc.insecure_channel(server.address) as channel:
            yield client, pb_grpc.EmbeddingStoreStub(channel)


def test_chunk_over_the_row_limit_is_resource_exhausted(limited):
    client, stub = limited
    before = client.lookup("lim", np.arange(40), on_miss="error")
    error = rpc_error(stub.Update, iter([update_chunk(np.arange(60), np.ones((60, 8), np.float32), table="lim")]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.details().startswith("ids")
    error = rpc_error(stub.Lookup, iter([pb.LookupRequest(table="lim", ids=encode_ids(np.arange(60)))]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.details().startswith("ids")
    np.testing.assert_array_equal(client.lookup("lim", np.arange(40), on_miss="error"), before)


def test_request_over_the_row_limit_is_resource_exhausted_and_changes_nothing(limited):
    client, stub = limited
    before = client.lookup("lim", np.arange(40), on_miss="error")
    chunks = [update_chunk(np.arange(i, i + 40), np.ones((40, 8), np.float32), table="lim") for i in (0, 40, 80)]
    error = rpc_error(stub.Update, iter(chunks))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.details().startswith("ids")
    with pytest.raises(ResourceExhaustedError):
        client.delete("lim", np.arange(120))
    np.testing.assert_array_equal(client.lookup("lim", np.arange(40), on_miss="error"), before)


def test_lookup_larger_than_the_limits_works_when_chunked_by_the_client(limited):
    client, _ = limited
    assert client.lookup("lim", np.arange(90), on_miss="zeros").shape == (90, 8)


def test_response_over_the_message_limit_is_resource_exhausted(limited):
    client, stub = limited
    client.create_table("wide", 4096, cache={"rows": 64, "ways": 8})    # 16 KiB rows: 4 fit in 64 KiB
    error = rpc_error(stub.Lookup, iter([pb.LookupRequest(table="wide", ids=encode_ids(np.arange(10)))]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.details().startswith("ids")
    assert client.lookup("wide", np.arange(10), on_miss="zeros").shape == (10, 4096)
