"""What the fuzz sends: hypothesis strategies for random bytes and for well-formed messages of every
method of kvstore.v1.EmbeddingStore, built from the protobuf descriptors, and one raw call.

Shared by tests/integration/test_fuzz.py (a few thousand cases in CI) and bench/fuzz_service.py
(the long run). Calls go through raw multi-callables with bytes in and bytes out, so what reaches
the server is exactly the generated payload, malformed or not.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st
from kvstore_proto.tensors import WIRE_DTYPES
from kvstore_proto.v1 import kvstore_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingStore"]
METHODS = sorted(SERVICE.methods_by_name)
CANARY = "canary"
FUZZ_TABLES = ("fuzz", "fuzz_wide")                 # tables the fuzz may create, write and drop
FUZZ_DIM = 8                                        # the dim the fixture gives "fuzz"
SNAPSHOT_NAMES = ("fuzz-snap", "fuzz.snap2")
MAX_DEPTH = 3
MAX_CHUNKS = 3
CALL_TIMEOUT = 20.0
ENDLESS = {"Subscribe"}      # server streams that run until the client cancels
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
CANARY_IDS = np.array([0, 7, -3, 2**40], dtype=np.int64)
CANARY_ROWS = np.random.default_rng(3).standard_normal((len(CANARY_IDS), 8)).astype(np.float32)
F = FieldDescriptor

ints64 = st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([0, 1, -1, 2**31, 2**62, 2**63 - 1, -2**63]))
ints32 = st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from([0, 1, -1, 8, 32, 64, 65536, 65537]))
uints64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1]))
doubles = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, -1.0]))
# never the canary: a well-formed call to it may legitimately change it
texts = st.text(max_size=40).filter(lambda text: text != CANARY)
table_names = st.one_of(st.sampled_from(FUZZ_TABLES), st.just(FUZZ_TABLES[0]), texts, st.just("x" * 9000))
snapshot_names = st.one_of(st.sampled_from(SNAPSHOT_NAMES), texts)
dtype_names = st.one_of(st.just("float32"), st.sampled_from(sorted(WIRE_DTYPES)), texts)
packed_ids = st.one_of(st.lists(st.integers(-3, 300), max_size=8),
                       st.lists(st.one_of(st.integers(-3, 300), ints64), max_size=64)).map(
    lambda ids: np.array(ids, dtype="<i8").tobytes())
id_bytes = st.one_of(packed_ids, st.binary(max_size=80))


@st.composite
def tensors(draw) -> dict:
    """A Tensor's fields: often consistent (data fits dtype x shape), often not."""
    dtype = draw(dtype_names)
    plausible = st.tuples(st.integers(0, 8), st.sampled_from([FUZZ_DIM, 2 * FUZZ_DIM])).map(list)
    shape = draw(st.one_of(plausible, plausible, st.lists(st.one_of(st.integers(0, 12), ints64), max_size=4)))
    itemsize = WIRE_DTYPES[dtype].itemsize if dtype in WIRE_DTYPES else 4
    count = int(np.prod([d for d in shape], dtype=object)) if shape else 1
    fits = 0 <= count * itemsize <= 4096 and all(d >= 0 for d in shape)
    if fits and draw(st.booleans()):
        values = draw(st.sampled_from([0.0, 1.5, -2.0, float("nan"), float("inf"), 1e38]))
        with np.errstate(all="ignore"):
            data = np.full(count, values).astype(WIRE_DTYPES.get(dtype, np.float32)).tobytes()
    else:
        data = draw(st.binary(max_size=256))
    return {"dtype": dtype, "shape": shape, "data": data}


SCALARS = {F.TYPE_INT64: ints64, F.TYPE_SINT64: ints64, F.TYPE_SFIXED64: ints64, F.TYPE_INT32: ints32,
           F.TYPE_SINT32: ints32, F.TYPE_SFIXED32: ints32, F.TYPE_UINT64: uints64, F.TYPE_FIXED64: uints64,
           F.TYPE_UINT32: st.integers(0, 2**32 - 1), F.TYPE_FIXED32: st.integers(0, 2**32 - 1),
           F.TYPE_DOUBLE: doubles, F.TYPE_FLOAT: st.floats(width=32), F.TYPE_BOOL: st.booleans(),
           F.TYPE_STRING: texts, F.TYPE_BYTES: st.binary(max_size=80), F.TYPE_ENUM: ints32}
enum_values = st.one_of(st.integers(-1, 5), ints32)
NAMED = {"table": table_names, "ids": id_bytes, "owner": st.one_of(texts, st.just("f" * 32)),
         "on_miss": enum_values, "mode": enum_values, "dim": st.one_of(st.just(FUZZ_DIM), ints32),
         "segment": st.one_of(texts, st.just("kvstore-" + "0" * 32))}      # same-host: absent or malformed


def field_values(field: FieldDescriptor, depth: int, message_name: str):
    """The strategy for one field's value; names the service reads get values it may accept."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(field_values(key, depth, ""), field_values(value, depth, ""), max_size=3)
    if field.message_type is not None:
        single = tensors() if field.message_type.name == "Tensor" else messages(field.message_type, depth + 1)
    elif field.name == "name":
        single = snapshot_names if "Snapshot" in message_name else table_names
    else:
        single = NAMED.get(field.name, SCALARS[field.type])
    return st.lists(single, max_size=4) if field.is_repeated else single


@st.composite
def messages(draw, descriptor, depth: int = 0) -> dict:
    """Field values for a message of `descriptor`: each field set or left out (the fields the
    service reads first, usually set); often the tensors are made to fit the ids, so that the
    checks after parsing run too, not only the first one."""
    values = {}
    if depth > MAX_DEPTH:
        return values
    for field in descriptor.fields:
        if draw(st.integers(0, 9)) < (8 if field.name in NAMED else 5):
            values[field.name] = draw(field_values(field, depth, descriptor.name))
    if isinstance(values.get("ids"), bytes) and len(values["ids"]) % 8 == 0 and draw(st.booleans()):
        rows = len(values["ids"]) // 8
        for name in ("weights", "grads"):
            if name in descriptor.fields_by_name:
                value = draw(st.sampled_from([0.0, 0.25, -3.0, float("nan"), 3e38]))
                values[name] = {"dtype": "float32", "shape": [rows, FUZZ_DIM],
                                "data": np.full((rows, FUZZ_DIM), value, "<f4").tobytes()}
    return values


@st.composite
def well_formed_requests(draw, method: str) -> list[bytes]:
    """Serialized request messages for `method`: one, or 0-3 chunks for a client stream."""
    descriptor = SERVICE.methods_by_name[method]
    kind = GetMessageClass(descriptor.input_type)
    count = draw(st.integers(0, MAX_CHUNKS)) if descriptor.client_streaming else 1
    return [kind(**draw(messages(descriptor.input_type))).SerializeToString() for _ in range(count)]


def raw_requests(method: str):
    """Random bytes as the request(s) of `method`: mostly malformed, sometimes valid by chance."""
    count = st.integers(0, MAX_CHUNKS) if SERVICE.methods_by_name[method].client_streaming else st.just(1)
    return count.flatmap(lambda n: st.lists(st.binary(max_size=200), min_size=n, max_size=n))


def raw_method(channel: grpc.Channel, method: str, serializer=None):
    """A multi-callable for `method` of the kind its descriptor says; responses stay bytes."""
    descriptor = SERVICE.methods_by_name[method]
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    return kind[descriptor.client_streaming, descriptor.server_streaming](
        f"/{SERVICE.full_name}/{method}", request_serializer=serializer, response_deserializer=None)


def call(channel: grpc.Channel, method: str, payloads: list[bytes]) -> grpc.StatusCode:
    """Send `payloads` as they are (bytes); the status code the call ended with."""
    descriptor = SERVICE.methods_by_name[method]
    multicallable = raw_method(channel, method)
    try:
        result = multicallable(iter(payloads) if descriptor.client_streaming else payloads[0],
                               timeout=CALL_TIMEOUT)
        if method in ENDLESS:
            next(result, None)            # a stream that never ends once accepted: its first message says so
            result.cancel()
        elif descriptor.server_streaming:
            for _ in result:
                pass
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@dataclass
class FuzzTarget:
    """A server under fuzz: `send` makes one call and says what broke (nothing, ideally)."""

    alive: Callable[[], bool]
    client: Any                       # a KVStoreClient on its own channel: checks the canary
    channel: grpc.Channel             # the channel every case goes through
    codes: dict = dataclass_field(default_factory=dict)     # (method, code name) -> calls

    def send(self, method: str, payloads: list[bytes]) -> list[str]:
        code = call(self.channel, method, payloads)
        self.codes[method, code.name] = self.codes.get((method, code.name), 0) + 1
        problems = [f"{method} answered {code.name}"] if code in FORBIDDEN else []
        if not self.alive():
            return [*problems, "the server died"]
        if call(self.channel, "ListTables", [b""]) != grpc.StatusCode.OK:
            problems.append("the channel stopped serving")
        if not np.array_equal(self.client.lookup(CANARY, CANARY_IDS, on_miss="error"), CANARY_ROWS):
            problems.append("the canary changed")
        if FUZZ_TABLES[0] not in self.client.list_tables():      # a fuzzed DropTable took it
            self.client.create_table(FUZZ_TABLES[0], FUZZ_DIM, cache={"rows": 256, "ways": 8})
        return problems

    def prepare(self) -> None:
        """The canary table with its rows, and the fuzz table the well-formed cases write to."""
        for name in (CANARY, FUZZ_TABLES[0]):
            self.client.create_table(name, FUZZ_DIM, cache={"rows": 256, "ways": 8})
        self.client.update(CANARY, CANARY_IDS, CANARY_ROWS)
