"""The lookup and export fast paths speak exactly the protobuf wire format."""
from __future__ import annotations

import platform
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from kvstore_proto.tensors import (
    IN_PLACE_MIN_BYTES,
    WIRE_DTYPES,
    InPlaceImportRequest,
    InPlaceTrainRequest,
    WireError,
    decode_export_chunk,
    decode_ids,
    decode_lookup_response,
    decode_tensor,
    decode_train_response,
    encode_lookup_response,
    encode_message,
    encode_tensor,
    read_train_request,
    train_response,
    train_response_into,
)
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


def in_place(array: np.ndarray, blob: bytes) -> bool:
    """Whether `array` is a view of `blob`'s bytes (read in place, not copied out)."""
    return np.shares_memory(array, np.frombuffer(blob, np.uint8))


@pytest.mark.parametrize("weights,state", CASES)
def test_encoded_response_parses_as_protobuf_and_its_rows_are_read_in_place(weights, state):
    """Our writer pads each tensor (`Tensor.align`) so that its data starts at a multiple of 8
    bytes: protobuf reads the same message, and the client views the rows without a copy."""
    blob = encode_lookup_response(weights, state)
    ours, theirs = pb.LookupResponse.FromString(blob), pb.LookupResponse.FromString(protobuf_bytes(weights, state))
    for field in ("weights", "state"):
        assert ours.HasField(field) == theirs.HasField(field)
        a, b = getattr(ours, field), getattr(theirs, field)
        assert (a.dtype, list(a.shape), a.data) == (b.dtype, list(b.shape), b.data)
    for got in decode_lookup_response(blob):
        if got is not None and got.size:
            assert got.flags.aligned and in_place(got, blob)


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
    from kvstore_server.allocator import keep_freed_memory

    libc = platform.libc_ver()[0]
    assert keep_freed_memory() is (libc == "glibc")


FREED_AFTER_BULK = """
import ctypes
from kvstore_server.allocator import keep_freed_memory, return_freed_memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

keep_freed_memory()
blocks = [ctypes.create_string_buffer(1 << 20) for _ in range(128)]   # heap blocks: below the mmap threshold
for block in blocks:
    ctypes.memset(block, 1, len(block))
del blocks
kept = rss()
print(return_freed_memory(), kept - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_memory_freed_by_a_bulk_operation_goes_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", FREED_AFTER_BULK], capture_output=True, text=True, check=True)
    trimmed, released = out.stdout.split()
    assert trimmed == "True"
    assert int(released) >= 64 << 20     # most of the 128 MiB the bulk operation had freed


FREED_BY_MANY_THREADS = """
import ctypes, threading
from kvstore_server.allocator import keep_freed_memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

keep_freed_memory()
THREADS, BLOCKS = 8, 16
turns = [threading.Event() for _ in range(THREADS + 1)]
done = threading.Event()

def work(i):                       # in turn: 16 MiB of heap blocks written and freed
    turns[i].wait()
    blocks = [ctypes.create_string_buffer(1 << 20) for _ in range(BLOCKS)]
    for block in blocks:
        ctypes.memset(block, 1, len(block))
    del blocks
    turns[i + 1].set()
    done.wait()                    # the thread lives on, as the server's pool threads do

threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
for thread in threads:
    thread.start()
before = rss()
turns[0].set()
turns[THREADS].wait()
print(rss() - before)
done.set()
for thread in threads:
    thread.join()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc arenas are glibc's")
def test_memory_freed_by_many_threads_is_kept_once_not_per_thread():
    """Eight long-lived threads each free 16 MiB in turn: with an arena per thread all 128 MiB
    stay resident; with the server's shared arenas the later threads reuse the first's."""
    out = subprocess.run([sys.executable, "-c", FREED_BY_MANY_THREADS], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 64 << 20


CLIENT_BUFFER_FAULTS = """
import resource, sys, threading
import numpy as np
from kvstore_client import KVStoreClient

client = KVStoreClient("127.0.0.1:1", keep_freed_memory=sys.argv[1] == "kept")   # connects lazily: no server

def receive():           # what a client's calls do: buffers of about a message's size, a little different
    for i in range(40):  # each time, written and freed, in the caller's thread and in others
        message = np.empty((2 << 20) + 4096 * (i % 3), np.uint8)
        message.fill(1)
        rows = message.copy()
        del message, rows

before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    thread = threading.Thread(target=receive)
    thread.start()
    thread.join()
receive()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
client.close()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_a_client_reuses_freed_message_buffers_instead_of_faulting_in_fresh_pages():
    """With glibc's defaults, 2 MiB buffers of varying size are mapped afresh and page-faulted
    in each time (about 44,000 faults here); a client tunes malloc to reuse them, unless told not to."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", CLIENT_BUFFER_FAULTS, mode], capture_output=True,
                                       text=True, check=True).stdout) for mode in ("kept", "default")}
    assert faults["kept"] * 4 < faults["default"], faults


@pytest.mark.parametrize("shape, data, names", [
    ([2**62, 4], b"", "weights.shape"),              # 2**64 elements: wraps to 0 in int64 arithmetic
    ([0, 2**63 - 1], b"", "weights.shape"),          # no elements, but no array can have the shape
    ([2**32, 2**32], b"\0" * 16, "weights.shape"),
    ([3, -1], b"", "weights.shape"),
    ([1] * 9, b"\0" * 4, "weights.shape"),
    ([2, 2], b"\0" * 17, "weights.data"),
])
def test_tensor_shapes_are_checked_without_overflow(shape, data, names):
    with pytest.raises(WireError, match=names):
        decode_tensor(pb.Tensor(dtype="float32", shape=shape, data=data), "weights")


def test_a_zero_row_tensor_of_a_reasonable_width_decodes():
    assert decode_tensor(pb.Tensor(dtype="float32", shape=[0, 1 << 20]), "weights").shape == (0, 1 << 20)


@pytest.mark.parametrize("sent, stored, accepted", [
    ("float32", "float32", True), ("float16", "float32", True), ("bfloat16", "float32", True),
    ("float32", "float64", True), ("int64", "float32", False), ("float64", "float32", False),
    ("float32", "float16", False), ("float32", "bfloat16", False), ("int64", "float64", False),
])
def test_tensors_must_arrive_in_the_stored_dtype_or_a_lossless_widening(sent, stored, accepted):
    tensor = pb.Tensor(dtype=sent, shape=[1, 2], data=b"\0" * 2 * WIRE_DTYPES[sent].itemsize)
    if accepted:
        assert decode_tensor(tensor, "weights", dtype=stored).shape == (1, 2)
    else:
        with pytest.raises(WireError, match="weights.dtype"):
            decode_tensor(tensor, "weights", dtype=stored)


def test_a_long_dtype_name_is_shortened_in_the_error():
    with pytest.raises(WireError) as caught:
        decode_tensor(pb.Tensor(dtype="x" * 10_000, shape=[1], data=b"\0"), "grads")
    assert "(10000 chars)" in str(caught.value) and len(str(caught.value)) < 200


def test_cache_device_and_host_tier_travel_both_ways():
    from kvstore_server.messages import table_config_from_proto, table_config_to_proto

    from kvstore import CacheConfig, TableConfig

    config = TableConfig(name="g", dim=4, cache=CacheConfig(rows=256, device="cuda:1", host_rows=1024,
                                                            host_policy="lfu"))
    message = table_config_to_proto(config)
    assert (message.cache.device, message.cache.host_rows, message.cache.host_policy) == ("cuda:1", 1024, "lfu")
    assert table_config_from_proto(message, "cpu") == config
    host = table_config_to_proto(TableConfig(name="h", dim=4))
    assert (host.cache.device, host.cache.host_rows, host.cache.host_policy) == ("cpu", 0, "")   # no host tier


def test_a_cache_without_a_device_gets_the_servers_default():
    from kvstore_server.messages import table_config_from_proto

    assert table_config_from_proto(pb.TableConfig(name="t", dim=4), "cuda:2").cache.device == "cuda:2"
    with_rows = pb.TableConfig(name="t", dim=4, cache=pb.CacheConfig(rows=64))
    assert table_config_from_proto(with_rows, "cuda").cache.device == "cuda"
    chosen = pb.TableConfig(name="t", dim=4, cache=pb.CacheConfig(device="cpu"))
    assert table_config_from_proto(chosen, "cuda").cache.device == "cpu"


def export_chunk_fields(weights: np.ndarray, state: np.ndarray) -> dict:
    n = len(weights)
    return {"ids": np.arange(n, dtype=np.int64) * 7 - 3, "weights": weights,
            "state": state if state is not None else np.zeros((n, 0), np.float32),
            "meta": np.arange(n * 3, dtype=np.int64).reshape(n, 3), "tombstones": np.arange(n % 3, dtype=np.int64)}


@pytest.mark.parametrize("weights,state", CASES)
def test_a_preserialized_export_chunk_and_its_in_place_decoding_agree_with_protobuf(weights, state):
    fields = export_chunk_fields(weights, state)
    head = pb.ExportChunk(estimated_rows=9, sequence=41, since_sequence=0, feed_id="f").SerializeToString()
    blob = encode_message({4: fields["weights"], 5: fields["state"], 6: fields["meta"]},
                          {3: fields["ids"], 62: fields["tombstones"]}, head)
    parsed = pb.ExportChunk.FromString(blob)
    assert (parsed.sequence, parsed.since_sequence, parsed.feed_id) == (41, 0, "f")
    assert parsed.HasField("since_sequence")
    assert parsed.ids == fields["ids"].astype("<i8").tobytes()
    assert parsed.weights.data == np.ascontiguousarray(weights, WIRE_DTYPES[parsed.weights.dtype]).tobytes()
    header, arrays = decode_export_chunk(blob)
    assert header == pb.ExportChunk(estimated_rows=9, sequence=41, since_sequence=0, feed_id="f")
    for name, expected in fields.items():
        got = arrays.get(name, np.zeros(0, np.int64))          # an empty bytes field is left out
        assert got.shape == expected.shape and (name not in arrays or not got.flags.writeable)
        np.testing.assert_array_equal(got, expected.astype(got.dtype))


@pytest.mark.parametrize("weights,state", CASES)
def test_an_import_request_read_in_place_reads_as_its_protobuf_message(weights, state):
    ids = np.arange(len(weights)) * 5 - 3
    meta = np.arange(len(weights) * 3, dtype=np.int64).reshape(-1, 3)
    header = pb.ImportRequest(table="t", mode=pb.IMPORT_MODE_REPLACE, idempotency_key="k", last=True,
                              config=pb.TableConfig(name="t", dim=3))
    blob = encode_message({5: weights, 6: state, 7: meta}, {4: ids}, header.SerializeToString())
    message, in_place = pb.ImportRequest.FromString(blob), InPlaceImportRequest(blob)
    for field in ("table", "mode", "idempotency_key", "last", "config"):
        assert getattr(in_place, field) == getattr(message, field), field
    for field in ("config", "weights", "state", "meta"):
        assert in_place.HasField(field) == message.HasField(field), field
    assert decode_ids(in_place.ids).tolist() == decode_ids(message.ids).tolist()
    for field in ("weights", "state", "meta"):
        if message.HasField(field):
            got = decode_tensor(getattr(in_place, field), field)
            assert not got.flags.writeable                      # a view of the request, not a copy
            np.testing.assert_array_equal(got, decode_tensor(getattr(message, field), field))


def test_a_malformed_import_request_read_in_place_is_a_value_error():
    blob = encode_message({5: np.ones((2, 3), np.float32)}, {4: np.arange(2)})
    with pytest.raises(ValueError):
        InPlaceImportRequest(blob[:-5] + b"\x2a\xff")          # weights cut short, then a truncated field


def test_a_chunk_field_nested_in_an_outer_message_parses_as_protobuf_nests_it():
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    blob = encode_message({5: weights}, {4: np.array([5, -1])}, within=1)
    parsed = pb.ImportChainRequest.FromString(blob + pb.ImportChainRequest(rows={"last": True}).SerializeToString())
    assert parsed.rows.last and decode_ids(parsed.rows.ids).tolist() == [5, -1]
    np.testing.assert_array_equal(decode_tensor(parsed.rows.weights, "weights"), weights)


def test_freed_memory_is_returned_once_per_many_rows_read_from_disk():
    from kvstore_server.allocator import DiskReads

    reads = DiskReads(rows_per_trim=1000)
    assert not reads.due(0)
    assert not reads.due(999)           # cached lookups read nothing: their buffers stay for reuse
    assert reads.due(1000)
    assert not reads.due(1500)          # counted from the last trim
    assert reads.due(2000)
    assert not reads.due(10)            # a new database counts from zero again
    assert reads.due(1000)


def test_a_row_buffer_keeps_one_chunk_as_it_is_and_copies_from_the_second_on():
    from kvstore_server.row_buffer import RowBuffer

    first = np.frombuffer(np.arange(12, dtype=np.float32).tobytes(), np.float32).reshape(3, 4)  # read-only, as decoded
    one = RowBuffer()
    one.append(first)
    assert one.first.shape == (0, 4) and one.first.dtype == np.float32
    taken = one.take()
    assert np.shares_memory(taken, first)             # a call of one chunk copies nothing
    np.testing.assert_array_equal(taken, first)

    many = RowBuffer()
    many.append(first)
    for fill in (7.0, 8.0):
        many.append(np.full((1500, 4), fill, np.float32))    # past the first capacity: the buffer grows
    rows = many.take()
    assert rows.shape == (3003, 4) and not np.shares_memory(rows, first)
    np.testing.assert_array_equal(rows[:3], first)
    assert (rows[3:1503] == 7.0).all() and (rows[1503:] == 8.0).all()
    np.testing.assert_array_equal(first, np.arange(12, dtype=np.float32).reshape(3, 4))   # the chunk is unchanged


def _train_request(n: int) -> pb.TrainRequest:
    """A Train message as protobuf builds it: two gradient pieces, a lookup, a prefetch and a piece
    with a shared array (same-host), plus the header fields."""
    rng = np.random.default_rng(n)
    return pb.TrainRequest(
        gradients=[pb.TableRows(table="users", ids=rng.integers(-9, 9, n).astype("<i8").tobytes(),
                                values=encode_tensor(rng.standard_normal((n, 16)).astype(np.float32))),
                   pb.TableRows(table="表", ids=np.arange(n, dtype="<i8").tobytes(),
                                values=encode_tensor(np.ones((n, 3), ml_dtypes.bfloat16)))],
        lookups=[pb.TableRows(table="items", ids=np.arange(n, dtype="<i8").tobytes()),
                 pb.TableRows(table="users", shared_ids=pb.SharedArray(dtype="int64", shape=[n], offset=64))],
        prefetches=[pb.TableRows(table="items", ids=np.arange(3, dtype="<i8").tobytes())],
        on_miss=pb.ON_MISS_ZEROS, more=True, segment="seg")


@pytest.mark.parametrize("n", [3, 5000])
def test_a_train_request_read_in_place_reads_as_its_protobuf_message(n):
    blob = _train_request(n).SerializeToString()
    message, in_place = pb.TrainRequest.FromString(blob), InPlaceTrainRequest(blob)
    assert isinstance(read_train_request(blob), InPlaceTrainRequest) == (len(blob) >= IN_PLACE_MIN_BYTES)
    for field in ("on_miss", "more", "segment"):
        assert getattr(in_place, field) == getattr(message, field), field
    for kind in ("gradients", "lookups", "prefetches"):
        assert len(getattr(in_place, kind)) == len(getattr(message, kind))
        for got, expected in zip(getattr(in_place, kind), getattr(message, kind), strict=True):
            assert got.table == expected.table
            for field in ("values", "shared_ids", "shared_values"):
                assert got.HasField(field) == expected.HasField(field), (kind, field)
            assert decode_ids(got.ids).tolist() == decode_ids(expected.ids).tolist()
            if expected.HasField("values"):
                values = decode_tensor(got.values, "values")
                assert not values.flags.writeable                   # a view of the request, not a copy
                np.testing.assert_array_equal(values, decode_tensor(expected.values, "values"))
            if expected.HasField("shared_ids"):
                assert got.shared_ids == expected.shared_ids


def test_a_train_request_piece_protobuf_would_merge_is_parsed_by_protobuf():
    doubled = pb.TableRows(table="a").SerializeToString() + pb.TableRows(table="b").SerializeToString()
    blob = b"\x12" + bytes([len(doubled)]) + doubled                # one piece whose table comes twice: last wins
    assert InPlaceTrainRequest(blob).lookups[0].table == pb.TrainRequest.FromString(blob).lookups[0].table == "b"


@pytest.mark.parametrize("tail", [b"\x0a\xff", b"\x0a\x05\x0a\x03\xff\xfe\xfd", b"\x0b"])
def test_a_malformed_train_request_read_in_place_is_a_value_error(tail):
    blob = _train_request(5000).SerializeToString()
    with pytest.raises(ValueError):                          # the server answers INVALID_ARGUMENT
        InPlaceTrainRequest(blob + tail)                     # cut short, a table name not UTF-8, a group


@pytest.mark.parametrize("n", [2, 40000])
def test_a_train_response_reads_as_protobuf_builds_it(n):
    weights = [np.arange(n * 4, dtype=np.float32).reshape(n, 4), np.ones((0, 4), np.float32),
               np.ones((n, 2), ml_dtypes.bfloat16)]
    rows = list(zip(["a", "b", "表"], weights, strict=True))
    blob = train_response(rows, {"a": n, "b": 0, "表": 2**40}, more=True)
    message = pb.TrainResponse.FromString(blob)
    assert message.more and dict(message.stepped) == {"a": n, "b": 0, "表": 2**40}
    assert [entry.table for entry in message.rows] == ["a", "b", "表"]
    for entry, expected in zip(message.rows, weights, strict=True):
        np.testing.assert_array_equal(decode_tensor(entry.values, "v"), expected)
    got_rows, stepped, more = decode_train_response(blob)
    assert more and stepped == dict(message.stepped) and [t for t, _ in got_rows] == ["a", "b", "表"]
    for (_, got), expected in zip(got_rows, weights, strict=True):
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    assert decode_train_response(train_response([])) == ([], {}, False)


@pytest.mark.parametrize("n", [1, 3, 40000])
def test_a_train_response_with_rows_written_in_place_is_the_one_built_by_copying(n):
    """The server's lookups gather straight into the answer (`train_response_into`): once its views
    are written, its bytes are `train_response`'s for the same rows, in every wire dtype."""
    rng = np.random.default_rng(n)
    weights = [rng.standard_normal((n, 4)).astype(np.float32), rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16),
               rng.standard_normal((n, 1)).astype(np.float16), rng.standard_normal((2, 130)).astype(np.float64)]
    rows = list(zip(["a", "", "表", "d"], weights, strict=True))
    stepped = {"a": n, "表": 2**40}
    message, views = train_response_into([(table, *w.shape, w.dtype) for table, w in rows], stepped)
    for view, (_, w) in zip(views, rows, strict=True):
        assert view.shape == w.shape and view.flags.writeable
        view[...] = w
    del views
    assert message == train_response(rows, stepped)
    assert train_response_into([], {"a": 1}) == (train_response([], {"a": 1}), [])
    assert train_response_into([("a", 0, 4, np.dtype(np.float32))], {}) is None        # no rows: built as usual
    assert train_response_into([("a", 2, 4, np.dtype(">f4"))], {}) is None             # no wire name


def test_train_steps_built_as_bytes_parse_as_the_messages_protobuf_would_build():
    from kvstore_client.training_stream import _step_messages

    grads = np.random.default_rng(1).standard_normal((3000, 32)).astype(np.float32)
    messages = _step_messages({"u": (np.arange(3000), grads)}, {"lookups": {"i": np.arange(5)}, "prefetches": {}},
                              pb.ON_MISS_INIT, 100_000)
    parsed = [pb.TrainRequest.FromString(blob) for blob in messages]
    assert len(parsed) > 1 and [m.more for m in parsed] == [True] * (len(parsed) - 1) + [False]
    assert all(m.on_miss == pb.ON_MISS_INIT for m in parsed)
    got = np.concatenate([decode_tensor(p.values, "v") for m in parsed for p in m.gradients])
    np.testing.assert_array_equal(got, grads)
    assert [p.table for m in parsed for p in m.lookups] == ["i"]


def test_fields_read_in_place_are_aligned_wherever_the_message_put_them():
    from kvstore_client.training_stream import _step_messages

    for n in range(1, 9):                         # table names of 1-8 bytes shift the rows' offsets
        blob = _step_messages({"t" * n: (np.arange(3000), np.ones((3000, 8), np.float32))}, {}, 0, 1 << 20)[0]
        piece = InPlaceTrainRequest(blob).gradients[0]
        for array in (decode_ids(piece.ids), decode_tensor(piece.values, "values")):
            assert array.flags.aligned and not array.flags.writeable
        np.testing.assert_array_equal(decode_tensor(piece.values, "values"), np.ones((3000, 8), np.float32))
        assert in_place(decode_tensor(piece.values, "values"), blob)            # the writer aligned them


# Rows whose Tensor (and enclosing TableRows) lengths cross a varint size with some padding and not
# with others: 20-40 rows of one float32 value, 40-80 of one float16, make tensors of about 100-180
# bytes, around 128, in steps of 4 and 2 bytes.
STRADDLING = [np.arange(rows, dtype=np.float32).reshape(rows, 1) for rows in range(20, 41)] + [
    np.arange(rows, dtype=np.float16).reshape(rows, 1) for rows in range(40, 81)] + [
    np.ones((4096, 128), np.float32), np.ones((3, 5), ml_dtypes.bfloat16), np.ones((7, 3), np.float64),
    np.ones((16384 // 4 - 3, 1), np.float16)]


@pytest.mark.parametrize("table", ["", "a", "abc", "表", "t" * 9, "u" * 130])
def test_every_writer_puts_tensor_data_at_a_multiple_of_8_and_protobuf_reads_what_was_written(table, monkeypatch):
    import kvstore_proto.tensors
    from kvstore_client.gradient_messages import GradientChunk
    from kvstore_client.snapshots import rows_request
    from kvstore_client.training_stream import _step_messages
    from kvstore_proto.tensors import lookup_response_into

    monkeypatch.setattr(kvstore_proto.tensors, "IN_PLACE_MIN_BYTES", 0)     # small answers read in place too
    for values in STRADDLING:
        n, dim = values.shape
        ids = np.arange(n, dtype=np.int64)
        blob = encode_lookup_response(values)
        got, _ = decode_lookup_response(blob)
        assert in_place(got, blob) and got.flags.aligned
        np.testing.assert_array_equal(decode_tensor(pb.LookupResponse.FromString(blob).weights, "w"), values)

        into, view = lookup_response_into(n, dim, values.dtype)
        view[...] = values
        del view
        assert into == blob

        rows = [(table, values), (table + "x", values[:1])]
        blob = train_response(rows, {table: n}, more=True)
        for (_, got), expected in zip(decode_train_response(blob)[0], [values, values[:1]], strict=True):
            assert got.flags.aligned and in_place(got, blob)
            np.testing.assert_array_equal(got, expected)
        message = pb.TrainResponse.FromString(blob)
        assert [entry.table for entry in message.rows] == [table, table + "x"] and message.more
        np.testing.assert_array_equal(decode_tensor(message.rows[0].values, "v"), values)

        into, views = train_response_into([(t, *v.shape, v.dtype) for t, v in rows], {table: n})
        for view, (_, v) in zip(views, rows, strict=True):
            view[...] = v
        del views
        assert into == train_response(rows, {table: n})

        blob = _step_messages({table: (ids, values)}, {"lookups": {table: ids}}, 0, 1 << 22)[0]
        piece = InPlaceTrainRequest(blob).gradients[0]
        assert in_place(decode_tensor(piece.values, "values"), blob)
        np.testing.assert_array_equal(decode_tensor(pb.TrainRequest.FromString(blob).gradients[0].values, "v"),
                                      values)

        header = pb.ImportRequest(table=table or "t", idempotency_key="k").SerializeToString()
        blob = rows_request(ids, values, None, None, header)
        assert in_place(decode_tensor(InPlaceImportRequest(blob).weights, "weights"), blob)
        np.testing.assert_array_equal(decode_tensor(pb.ImportRequest.FromString(blob).weights, "w"), values)

        blob = encode_message({4: values, 6: ids.reshape(-1, 1)}, {3: ids},
                              pb.ExportChunk(estimated_rows=n, sequence=41, feed_id=table).SerializeToString())
        _, arrays = decode_export_chunk(blob)
        assert in_place(arrays["weights"], blob) and in_place(arrays["meta"], blob)

        chunk = GradientChunk(table or "t", ids, values, table, "key", np.ones(n, np.float32))
        message = pb.ApplyGradientsRequest.FromString(chunk.serialize())
        assert (message.table, message.owner, message.idempotency_key) == (table or "t", table, "key")
        np.testing.assert_array_equal(decode_tensor(message.grads, "grads"), values)
        np.testing.assert_array_equal(decode_tensor(message.scores, "scores"), np.ones(n, np.float32))
