"""The bad-input cases of issue 12 as data: which method, which request(s), which status code,
which field the message must name. `test_bad_input_suite.py` sends each through a real server.

Cases that today's server answers wrongly carry `known` (the issue item and who fixes it); the
suite marks them strict xfail, so each one shows up as XPASS (a failure) the day it is fixed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from kvstore_proto.tensors import encode_ids, encode_tensor
from kvstore_proto.v1 import kvstore_pb2 as pb

C = grpc.StatusCode
CANARY, SECOND, STEEP = "canary", "second", "steep"
DIM = 8
CANARY_IDS = np.array([0, 1, 2, 3, -5, 2**62], dtype=np.int64)
CANARY_ROWS = np.random.default_rng(12).standard_normal((len(CANARY_IDS), DIM)).astype(np.float32)
MAX_CHUNK_ROWS = 1 << 20                  # the server default (ServerConfig.max_chunk_rows)

SERVICE = "asyncio service"
STORE = "store core"


@dataclass(frozen=True)
class Case:
    """One bad request: `requests()` builds the message (unary) or the list of chunks (client stream)."""

    name: str
    method: str
    requests: Callable[[], object]
    code: grpc.StatusCode
    field: str | tuple[str, ...] | None   # the message starts with it (or one of them); None: grpc core
    known: str | None = None              # 'item N: fixed by the ...' while today's server fails


def tensor(array=None, *, dtype: str | None = None, shape=None, data: bytes | None = None) -> pb.Tensor:
    """A wire tensor from an array, with any of its fields overridden (to make it wrong)."""
    fields = encode_tensor(np.zeros((0, DIM), np.float32) if array is None else np.asarray(array))
    fields.update({k: v for k, v in (("dtype", dtype), ("shape", shape), ("data", data)) if v is not None})
    return pb.Tensor(**fields)


def rows(n: int, value: float = 1.0, dtype=np.float32, dim: int = DIM) -> np.ndarray:
    return np.full((n, dim), value, dtype=dtype)


def ids(*values: int) -> bytes:
    return encode_ids(np.array(values or CANARY_IDS[:2], dtype=np.int64))


def config(name: str = "fresh", dim: int = DIM, **nested) -> pb.TableConfig:
    return pb.TableConfig(name=name, dim=dim, **nested)


def create(name: str, **kwargs) -> Case:
    """A CreateTable case; the table must not exist afterwards (the suite checks the table list)."""
    message = kwargs.pop("message")
    return Case(name, "CreateTable", lambda: pb.CreateTableRequest(config=message()), **kwargs)


def update(chunks: Callable[[], list], code=C.INVALID_ARGUMENT, field_name="weights", **kwargs) -> Case:
    return Case(kwargs.pop("name"), "Update", chunks, code, field_name, **kwargs)


def update_chunk(weights=None, table: str = CANARY, id_bytes: bytes | None = None, **kwargs) -> pb.UpdateRequest:
    return pb.UpdateRequest(table=table, ids=ids() if id_bytes is None else id_bytes,
                            weights=tensor(rows(2)) if weights is None else weights, **kwargs)


def grads_chunk(grads=None, table: str = CANARY, id_bytes: bytes | None = None, **kwargs):
    return pb.ApplyGradientsRequest(table=table, ids=ids() if id_bytes is None else id_bytes,
                                    grads=tensor(rows(2)) if grads is None else grads, **kwargs)


def import_chunk(table: str = CANARY, weights=None, **kwargs) -> pb.ImportRequest:
    return pb.ImportRequest(table=table, ids=ids(), weights=tensor(rows(2)) if weights is None else weights,
                            **kwargs)


def chain(rows: pb.ImportRequest | None = None, sequence: int = 5, **kwargs) -> pb.ImportChainRequest:
    """One ImportChain chunk: rows of the canary (a full link) unless `rows` says otherwise."""
    return pb.ImportChainRequest(rows=import_chunk() if rows is None else rows, sequence=sequence, **kwargs)


class Malformed(bytes):
    """Bytes sent as they are: no protobuf message (a length running past the end), or one built by hand."""

    def SerializeToString(self) -> bytes:
        return bytes(self)


TRUNCATED = Malformed(b"\x0a\xff")
LONG = "a" * 8192
UNICODE = "表格-emb"

NAME_CASES = [
    create("name_8KB", message=lambda: config(LONG), code=C.INVALID_ARGUMENT, field="name"),
    create("name_64KB", message=lambda: config("a" * 65536), code=C.INVALID_ARGUMENT, field="name"),
    create("name_unicode", message=lambda: config(UNICODE), code=C.INVALID_ARGUMENT, field="name"),
    create("name_nul", message=lambda: config("a\x00b"), code=C.INVALID_ARGUMENT, field="name"),
    create("name_129_chars", message=lambda: config("n" * 129), code=C.INVALID_ARGUMENT, field="name"),
    create("name_dot_first", message=lambda: config(".hidden"), code=C.INVALID_ARGUMENT, field="name"),
    create("name_path", message=lambda: config("../escape"), code=C.INVALID_ARGUMENT, field="name"),
    create("no_config", message=lambda: None, code=C.INVALID_ARGUMENT, field="name"),
    create("existing_canary", message=lambda: config(CANARY, dim=4), code=C.ALREADY_EXISTS, field="name"),
    Case("drop_name_8KB", "DropTable", lambda: pb.DropTableRequest(table=LONG), C.INVALID_ARGUMENT, "table"),
    Case("describe_unicode", "DescribeTable", lambda: pb.DescribeTableRequest(table=UNICODE),
         C.INVALID_ARGUMENT, "table"),
    Case("describe_3000_accented", "DescribeTable", lambda: pb.DescribeTableRequest(table="é" * 3000),
         C.INVALID_ARGUMENT, "table"),
    Case("stats_name_1MiB", "Stats", lambda: pb.StatsRequest(table="s" * (1 << 20)), C.INVALID_ARGUMENT, "table"),
    Case("evict_unknown", "Evict", lambda: pb.EvictRequest(table="nope"), C.NOT_FOUND, "table"),
    Case("restore_rows_unknown", "RestoreRows", lambda: pb.RestoreRowsRequest(table="nope", ids=ids()),
         C.NOT_FOUND, "table"),
    Case("release_unknown", "Release", lambda: pb.ReleaseRequest(table="nope", ids=ids(), owner="x"),
         C.NOT_FOUND, "table"),
    Case("lookup_name_8KB", "Lookup", lambda: [pb.LookupRequest(table=LONG, ids=ids())], C.INVALID_ARGUMENT,
         "table"),
]

CONFIG_CASES = [
    create("dim_65537", message=lambda: config(dim=65537), code=C.INVALID_ARGUMENT, field="dim"),
    create("dim_int32_min", message=lambda: config(dim=-2**31), code=C.INVALID_ARGUMENT, field="dim"),
    create("dtype_int64", message=lambda: pb.TableConfig(name="fresh", dim=DIM, dtype="int64"),
           code=C.INVALID_ARGUMENT, field="dtype"),
    create("dtype_upper_case", message=lambda: pb.TableConfig(name="fresh", dim=DIM, dtype="FLOAT32"),
           code=C.INVALID_ARGUMENT, field="dtype"),
    *[create(f"optimizer_{key}_{value}", message=lambda k=key, v=value: config(optimizer={"name": "adam", k: v}),
             code=C.INVALID_ARGUMENT, field=f"optimizer.{key}")
      for key, value in (("lr", float("nan")), ("lr", -1.0), ("eps", float("inf")), ("beta1", 1.0),
                         ("beta2", -0.5), ("weight_decay", float("-inf")))],
    create("optimizer_name_case", message=lambda: config(optimizer={"name": "Adam"}), code=C.INVALID_ARGUMENT,
           field="optimizer.name"),
    create("initializer_kind", message=lambda: config(initializer={"kind": "xavier"}), code=C.INVALID_ARGUMENT,
           field="initializer.kind"),
    create("initializer_scale_inf", message=lambda: config(initializer={"scale": float("inf")}),
           code=C.INVALID_ARGUMENT, field="initializer.scale"),
    create("cache_ways_65", message=lambda: config(cache={"rows": 650, "ways": 65}), code=C.INVALID_ARGUMENT,
           field="cache.ways"),
    create("cache_ways_negative", message=lambda: config(cache={"ways": -1}), code=C.INVALID_ARGUMENT,
           field="cache.ways"),
    create("cache_rows_negative", message=lambda: config(cache={"rows": -64}), code=C.INVALID_ARGUMENT,
           field="cache.rows"),
    create("cache_rows_2_40", message=lambda: config(cache={"rows": 1 << 40}), code=C.INVALID_ARGUMENT,
           field="cache.rows"),
    create("cache_larger_than_memory", message=lambda: config(dim=65536, cache={"rows": 1 << 34}),
           code=C.RESOURCE_EXHAUSTED, field="cache.rows"),
    create("cache_policy", message=lambda: config(cache={"policy": "fifo"}), code=C.INVALID_ARGUMENT,
           field="cache.policy"),
    create("cache_write", message=lambda: config(cache={"write": "write_around"}), code=C.INVALID_ARGUMENT,
           field="cache.write"),
    *[create(f"eviction_{key}_{value}", message=lambda k=key, v=value: config(eviction={k: v}),
             code=C.INVALID_ARGUMENT, field=f"eviction.{key}")
      for key, value in (("ttl_seconds", -1.0), ("ttl_seconds", float("nan")), ("max_rows", -1),
                         ("headroom", 1.0), ("capacity_policy", "random"), ("samples", 0), ("samples", 1025),
                         ("sketch_width", 1), ("decay_rate", float("nan")), ("interval_seconds", float("inf")))],
]

TENSOR_CASES = [
    update(name="weights_int64_to_float32", chunks=lambda: [update_chunk(tensor(rows(2, 2**53 + 1, np.int64)))],
           field_name="weights.dtype"),
    update(name="weights_float64_to_float32", chunks=lambda: [update_chunk(tensor(rows(2, 0.1, np.float64)))],
           field_name="weights.dtype"),
    update(name="weights_dtype_int8", chunks=lambda: [update_chunk(tensor(rows(2), dtype="int8"))],
           field_name="weights.dtype"),
    update(name="weights_dtype_empty", chunks=lambda: [update_chunk(tensor(rows(2), dtype=""))],
           field_name="weights.dtype"),
    update(name="weights_absent", chunks=lambda: [pb.UpdateRequest(table=CANARY, ids=ids())],
           field_name="weights.dtype"),
    update(name="weights_shape_2_62_by_4", chunks=lambda: [update_chunk(tensor(rows(2), shape=[2**62, 4]))],
           field_name="weights.shape"),
    update(name="weights_shape_2_62_by_4_no_data",
           chunks=lambda: [update_chunk(tensor(rows(0), shape=[2**62, 4]), id_bytes=b"")],
           field_name="weights.shape"),
    update(name="weights_shape_0_by_int64_max",
           chunks=lambda: [update_chunk(tensor(rows(0), shape=[0, 2**63 - 1]), id_bytes=b"")],
           field_name="weights.shape"),
    update(name="weights_shape_2_32_squared",
           chunks=lambda: [update_chunk(tensor(rows(2), shape=[2**32, 2**32]))], field_name="weights.shape"),
    update(name="weights_shape_negative", chunks=lambda: [update_chunk(tensor(rows(2), shape=[-2, -8]))],
           field_name="weights.shape"),
    update(name="weights_rank_64", chunks=lambda: [update_chunk(tensor(rows(2), shape=[1] * 64))],
           field_name="weights.shape"),
    update(name="weights_one_byte_too_many",
           chunks=lambda: [update_chunk(tensor(rows(2), data=rows(2).tobytes() + b"\0"))],
           field_name="weights.data"),
    update(name="weights_for_no_ids", chunks=lambda: [update_chunk(tensor(rows(1)), id_bytes=b"")]),
    update(name="weights_rank_3", chunks=lambda: [update_chunk(tensor(np.ones((2, DIM, 1), np.float32)))]),
    update(name="state_for_sgd_table", chunks=lambda: [update_chunk(state=tensor(rows(2, dim=3)))],
           field_name="state"),
    update(name="state_int64", chunks=lambda: [update_chunk(state=tensor(np.zeros((2, 0), np.int64)))],
           field_name="state.dtype"),
    update(name="weights_nan_second_chunk",
           chunks=lambda: [update_chunk(), update_chunk(tensor(rows(2, np.nan)))]),
    update(name="weights_inf_float16", chunks=lambda: [update_chunk(tensor(rows(2, np.inf, np.float16)))]),
    update(name="second_chunk_other_width",
           chunks=lambda: [update_chunk(), update_chunk(tensor(rows(2, dim=DIM + 1)))]),
    update(name="second_chunk_lacks_state",
           chunks=lambda: [update_chunk(state=tensor(rows(2, dim=0))), update_chunk()], field_name="state"),
    update(name="scores_wrong_length", chunks=lambda: [update_chunk(scores=tensor(np.ones(3, np.float32)))],
           field_name="scores"),
    update(name="mixed_tables", chunks=lambda: [update_chunk(), update_chunk(table=SECOND)],
           field_name="table"),
    update(name="unknown_table_second_chunk", chunks=lambda: [update_chunk(), update_chunk(table="nope")],
           field_name="table"),
]

ROW_CASES = [
    Case("lookup_on_miss_negative", "Lookup", lambda: [pb.LookupRequest(table=CANARY, ids=ids(), on_miss=-1)],
         C.INVALID_ARGUMENT, "on_miss"),
    Case("lookup_on_miss_5", "Lookup", lambda: [pb.LookupRequest(table=CANARY, ids=ids(), on_miss=5)],
         C.INVALID_ARGUMENT, "on_miss"),
    Case("lookup_chunk_over_row_limit", "Lookup",
         lambda: [pb.LookupRequest(table=CANARY, ids=encode_ids(np.arange(MAX_CHUNK_ROWS + 1)))],
         C.RESOURCE_EXHAUSTED, "ids"),
    Case("lookup_message_over_17MiB", "Lookup",
         lambda: [pb.LookupRequest(table=CANARY, ids=b"\0" * (17 << 20))], C.RESOURCE_EXHAUSTED, None),
    Case("lookup_missing_with_error", "Lookup",
         lambda: [pb.LookupRequest(table=CANARY, ids=ids(404), on_miss=pb.ON_MISS_ERROR)], C.NOT_FOUND, "ids"),
    Case("delete_chunk_over_row_limit", "Delete",
         lambda: [pb.DeleteRequest(table=CANARY, ids=encode_ids(np.arange(MAX_CHUNK_ROWS + 1)))],
         C.RESOURCE_EXHAUSTED, "ids"),
    Case("delete_mixed_tables", "Delete",
         lambda: [pb.DeleteRequest(table=SECOND, ids=ids()), pb.DeleteRequest(table=CANARY, ids=ids())],
         C.INVALID_ARGUMENT, "table"),
    Case("delete_ids_7_bytes", "Delete", lambda: [pb.DeleteRequest(table=CANARY, ids=b"\1" * 7)],
         C.INVALID_ARGUMENT, "ids"),
    Case("grads_int64", "ApplyGradients", lambda: [grads_chunk(tensor(rows(2, 3, np.int64)))],
         C.INVALID_ARGUMENT, "grads.dtype"),
    Case("grads_wrong_dim", "ApplyGradients", lambda: [grads_chunk(tensor(rows(2, dim=DIM - 1)))],
         C.INVALID_ARGUMENT, "grads"),
    Case("grads_nan", "ApplyGradients", lambda: [grads_chunk(tensor(rows(2, np.nan)))], C.INVALID_ARGUMENT,
         "grads"),
    Case("grads_shape_overflow", "ApplyGradients", lambda: [grads_chunk(tensor(rows(2), shape=[2**62, 4]))],
         C.INVALID_ARGUMENT, "grads.shape"),
    Case("grads_scores_wrong_length", "ApplyGradients",
         lambda: [grads_chunk(scores=tensor(np.ones(5, np.float32)))], C.INVALID_ARGUMENT, "scores"),
    Case("grads_mixed_tables", "ApplyGradients", lambda: [grads_chunk(), grads_chunk(table=SECOND)],
         C.INVALID_ARGUMENT, "table"),
    Case("grads_step_to_inf", "ApplyGradients", lambda: [grads_chunk(tensor(rows(2, 1e9)), table=STEEP)],
         C.INVALID_ARGUMENT, ("grads", "ids")),
    Case("prefetch_lock_without_owner", "Prefetch", lambda: [pb.PrefetchRequest(table=CANARY, ids=ids(),
                                                                                lock=True)],
         C.INVALID_ARGUMENT, "owner"),
    Case("prefetch_lock_unknown_owner", "Prefetch",
         lambda: [pb.PrefetchRequest(table=CANARY, ids=ids(), lock=True, owner="f" * 32)],
         C.FAILED_PRECONDITION, "owner"),
    Case("prefetch_mixed_tables", "Prefetch", lambda: [pb.PrefetchRequest(table=CANARY, ids=ids()),
                                                       pb.PrefetchRequest(table=SECOND, ids=ids())],
         C.INVALID_ARGUMENT, "table"),
    Case("release_ids_3_bytes", "Release", lambda: pb.ReleaseRequest(table=CANARY, ids=b"abc", owner="x"),
         C.INVALID_ARGUMENT, "ids"),
]

SNAPSHOT_CASES = [
    *[Case(f"snapshot_name_{label}", "CreateSnapshot", lambda n=name: pb.CreateSnapshotRequest(name=n),
           C.INVALID_ARGUMENT, "name")
      for label, name in (("empty", ""), ("parent", ".."), ("slash", "a/b"), ("129_chars", "s" * 129),
                          ("unicode", "snäpshot"), ("8KB", LONG), ("newline", "snap\n"))],
    Case("snapshot_existing", "CreateSnapshot", lambda: pb.CreateSnapshotRequest(name="kept"),
         C.ALREADY_EXISTS, "name"),
    Case("snapshot_delete_unknown", "DeleteSnapshot", lambda: pb.DeleteSnapshotRequest(name="never"),
         C.NOT_FOUND, "name"),
    Case("snapshot_restore_unknown", "RestoreSnapshot", lambda: pb.RestoreSnapshotRequest(name="never"),
         C.NOT_FOUND, "name"),
    Case("snapshot_restore_bad_name", "RestoreSnapshot", lambda: pb.RestoreSnapshotRequest(name="../x"),
         C.INVALID_ARGUMENT, "name"),
    *[Case(f"snapshot_{method.lower()}_nul_in_name", method, lambda m=message: m(name="y\x00"),
           C.INVALID_ARGUMENT, "name")       # no path is made of a name that is not one (the fuzz found INTERNAL)
      for method, message in (("CreateSnapshot", pb.CreateSnapshotRequest),
                              ("DeleteSnapshot", pb.DeleteSnapshotRequest),
                              ("RestoreSnapshot", pb.RestoreSnapshotRequest))],
    Case("export_unknown", "Export", lambda: pb.ExportRequest(table="nope"), C.NOT_FOUND, "table"),
    Case("export_chunk_rows_negative", "Export", lambda: pb.ExportRequest(table=CANARY, chunk_rows=-1),
         C.INVALID_ARGUMENT, "chunk_rows"),
    Case("export_chunk_rows_2_62", "Export", lambda: pb.ExportRequest(table=CANARY, chunk_rows=2**62),
         C.INVALID_ARGUMENT, "chunk_rows"),
    Case("import_mode_7", "Import", lambda: [import_chunk(mode=7)], C.INVALID_ARGUMENT, "mode"),
    Case("import_mode_negative", "Import", lambda: [import_chunk(mode=-1)], C.INVALID_ARGUMENT, "mode"),
    Case("import_empty_stream", "Import", lambda: [], C.INVALID_ARGUMENT, "table"),
    Case("import_unknown_table", "Import", lambda: [import_chunk("nope")], C.NOT_FOUND, "table"),
    Case("import_wrong_dim", "Import", lambda: [import_chunk(weights=tensor(rows(2, dim=3)))],
         C.INVALID_ARGUMENT, "weights"),
    Case("import_nan", "Import", lambda: [import_chunk(weights=tensor(rows(2, np.nan)))], C.INVALID_ARGUMENT,
         "weights"),
    Case("import_meta_wrong_shape", "Import", lambda: [import_chunk(meta=tensor(np.zeros((2, 2), np.int64)))],
         C.INVALID_ARGUMENT, "meta"),
    Case("import_replace_bad_second_chunk", "Import",
         lambda: [import_chunk(mode=pb.IMPORT_MODE_REPLACE), import_chunk(weights=tensor(rows(2, np.inf)))],
         C.INVALID_ARGUMENT, "weights"),
    Case("import_mixed_tables", "Import", lambda: [import_chunk(), import_chunk(SECOND)], C.INVALID_ARGUMENT,
         "table"),
    Case("import_int64_weights", "Import", lambda: [import_chunk(weights=tensor(rows(2, 2**53 + 1, np.int64)))],
         C.INVALID_ARGUMENT, "weights.dtype"),
    Case("import_config_other_dim", "Import",
         lambda: [import_chunk(config=config(CANARY, dim=DIM * 2), weights=tensor(rows(2, dim=DIM * 2)))],
         C.INVALID_ARGUMENT, "config.dim"),
]

LEASE_CASES = [
    Case("grant_lease_malformed", "GrantLease", lambda: TRUNCATED, C.INVALID_ARGUMENT, "GrantLease"),
    Case("keep_alive_no_lease", "KeepAlive", lambda: pb.KeepAliveRequest(), C.INVALID_ARGUMENT, "lease"),
    Case("keep_alive_unknown_lease", "KeepAlive", lambda: pb.KeepAliveRequest(lease="never-granted"),
         C.FAILED_PRECONDITION, "lease"),
    Case("keep_alive_8KB_lease", "KeepAlive", lambda: pb.KeepAliveRequest(lease=LONG), C.FAILED_PRECONDITION,
         "lease"),
    Case("revoke_lease_no_lease", "RevokeLease", lambda: pb.RevokeLeaseRequest(), C.INVALID_ARGUMENT, "lease"),
    Case("revoke_lease_unknown", "RevokeLease", lambda: pb.RevokeLeaseRequest(lease="never-granted"),
         C.FAILED_PRECONDITION, "lease"),
    Case("revoke_lease_malformed", "RevokeLease", lambda: TRUNCATED, C.INVALID_ARGUMENT, "RevokeLease"),
]

REPLICATION_CASES = [
    Case("subscribe_interval_negative", "Subscribe", lambda: pb.SubscribeRequest(interval_seconds=-1),
         C.INVALID_ARGUMENT, "interval_seconds"),
    Case("subscribe_interval_nan", "Subscribe", lambda: pb.SubscribeRequest(interval_seconds=float("nan")),
         C.INVALID_ARGUMENT, "interval_seconds"),
    Case("subscribe_interval_1e9", "Subscribe", lambda: pb.SubscribeRequest(interval_seconds=1e9),
         C.INVALID_ARGUMENT, "interval_seconds"),
    Case("subscribe_unknown_table", "Subscribe", lambda: pb.SubscribeRequest(tables=[CANARY, "nope"]),
         C.NOT_FOUND, "table"),
    Case("subscribe_table_8KB", "Subscribe", lambda: pb.SubscribeRequest(tables=[LONG]), C.INVALID_ARGUMENT,
         "table"),
    Case("subscribe_other_feed", "Subscribe", lambda: pb.SubscribeRequest(feed_id="another-data-dir"),
         C.FAILED_PRECONDITION, "feed_id"),
    Case("subscribe_from_2_62", "Subscribe", lambda: pb.SubscribeRequest(from_sequence=2**62),
         C.FAILED_PRECONDITION, "from_sequence"),
    Case("export_since_negative", "Export", lambda: pb.ExportRequest(table=CANARY, since_sequence=-3),
         C.INVALID_ARGUMENT, "since_sequence"),
    Case("export_since_2_62", "Export", lambda: pb.ExportRequest(table=CANARY, since_sequence=2**62),
         C.FAILED_PRECONDITION, "since_sequence"),
    Case("import_chain_empty_stream", "ImportChain", lambda: [], C.INVALID_ARGUMENT, "rows.table"),
    Case("import_chain_sequence_negative", "ImportChain", lambda: [chain(sequence=-1)], C.INVALID_ARGUMENT,
         "sequence"),
    Case("import_chain_since_after_sequence", "ImportChain", lambda: [chain(sequence=5, since_sequence=9)],
         C.INVALID_ARGUMENT, "since_sequence"),
    Case("import_chain_delta_replace", "ImportChain",
         lambda: [chain(import_chunk(mode=pb.IMPORT_MODE_REPLACE), since_sequence=1)], C.INVALID_ARGUMENT,
         "rows.mode"),
    Case("import_chain_delta_without_full", "ImportChain", lambda: [chain(since_sequence=1)],
         C.FAILED_PRECONDITION, "since_sequence"),
    Case("import_chain_mode_7", "ImportChain", lambda: [chain(import_chunk(mode=7))], C.INVALID_ARGUMENT, "mode"),
    Case("import_chain_unknown_table", "ImportChain", lambda: [chain(import_chunk("nope"))], C.NOT_FOUND, "table"),
    Case("import_chain_nan_second_chunk", "ImportChain",
         lambda: [chain(), chain(import_chunk(weights=tensor(rows(2, np.nan))))], C.INVALID_ARGUMENT, "weights"),
    Case("import_chain_tombstones_3_bytes", "ImportChain", lambda: [chain(), chain(tombstones=b"abc")],
         C.INVALID_ARGUMENT, "tombstones"),
    Case("import_chain_mixed_tables", "ImportChain", lambda: [chain(), chain(import_chunk(SECOND))],
         C.INVALID_ARGUMENT, "rows.table"),
    Case("import_chain_chunk_after_last", "ImportChain", lambda: [chain(import_chunk(last=True)), chain()],
         C.INVALID_ARGUMENT, "rows.last"),
    Case("import_chain_malformed_second_chunk", "ImportChain", lambda: [chain(), TRUNCATED], C.INVALID_ARGUMENT,
         "ImportChain"),
    Case("import_malformed_second_chunk", "Import", lambda: [import_chunk(), TRUNCATED], C.INVALID_ARGUMENT,
         "Import"),
    Case("import_malformed_weights_tensor", "Import", lambda: [import_chunk(), Malformed(b"\x2a\x03\x0a\x05a")],
         C.INVALID_ARGUMENT, "Import"),
]

def train_rows(table: str = CANARY, n: int = 2, dim: int = DIM) -> pb.TableRows:
    return pb.TableRows(table=table, ids=ids(*range(n)), values=tensor(rows(n, 0.5, dim=dim)))


def large_step(table: str | bytes = CANARY, dim: int = DIM) -> bytes:
    """A serialized Train message of one gradient piece over 64 KiB (read in place by the server)."""
    n = (64 << 10) // (4 * dim) + 1
    name = table.encode() if isinstance(table, str) else table
    piece = pb.TableRows(table="T" * len(name), ids=ids(*range(n)), values=tensor(rows(n, 0.5, dim=dim)))
    blob = pb.TrainRequest(gradients=[piece]).SerializeToString()
    return blob.replace(b"T" * len(name), name, 1)           # protobuf would refuse to build a bad name


TRAINING_AND_CLUSTER_CASES = [
    Case("train_on_miss_error", "Train", lambda: [pb.TrainRequest(lookups=[train_rows()], on_miss=pb.ON_MISS_ERROR)],
         C.INVALID_ARGUMENT, "on_miss"),
    Case("train_gradient_shape", "Train", lambda: [pb.TrainRequest(gradients=[train_rows(dim=DIM + 1)])],
         C.INVALID_ARGUMENT, "gradients[0].values"),
    Case("train_malformed", "Train", lambda: [TRUNCATED], C.INVALID_ARGUMENT, "Train"),
    # steps of 64 KiB and more are read in place (kvstore_proto.tensors.InPlaceTrainRequest), not by protobuf
    Case("train_large_malformed", "Train", lambda: [Malformed(large_step() + TRUNCATED)], C.INVALID_ARGUMENT,
         "Train"),
    Case("train_large_gradient_shape", "Train", lambda: [Malformed(large_step(dim=DIM + 1))], C.INVALID_ARGUMENT,
         "gradients[0].values"),
    Case("train_large_table_not_utf8", "Train",
         lambda: [Malformed(large_step(b"\xff\xfe"))], C.INVALID_ARGUMENT, "Train"),
    Case("train_large_ids_7_bytes", "Train",
         lambda: [Malformed(large_step() + pb.TrainRequest(lookups=[pb.TableRows(table=CANARY, ids=b"1234567")])
                            .SerializeToString())], C.INVALID_ARGUMENT, "lookups[0].ids"),
    Case("set_manifest_no_shards", "SetClusterManifest",
         lambda: pb.SetClusterManifestRequest(manifest=pb.ClusterManifest(cluster_id="c", function="hash")),
         C.INVALID_ARGUMENT, "manifest.shards"),
    Case("set_manifest_index_past_shards", "SetClusterManifest",
         lambda: pb.SetClusterManifestRequest(manifest=pb.ClusterManifest(cluster_id="c", shards=2, shard_index=2,
                                                                          function="hash")),
         C.INVALID_ARGUMENT, "manifest.shard_index"),
    Case("get_manifest_malformed", "GetClusterManifest", lambda: TRUNCATED, C.INVALID_ARGUMENT, "GetClusterManifest"),
]

ABSENT_SEGMENT = "kvstore-" + "0" * 32          # well formed, never created
SHARED_IDS = pb.SharedArray(dtype="int64", shape=[2])
SAME_HOST_CASES = [       # hostile regions of a real segment: tests/integration/test_same_host_hostile.py
    Case("attach_segment_path", "AttachSegment", lambda: pb.AttachSegmentRequest(segment="../../etc/passwd",
                                                                                token=b"t" * 16),
         C.INVALID_ARGUMENT, "segment"),
    Case("attach_device_buffer_path", "AttachDeviceBuffer",
         lambda: pb.AttachDeviceBufferRequest(buffer="../../dev/nvidia0", handle=b"h" * 64, size=1 << 20,
                                              device_uuid=b"u" * 16, token=b"t" * 16),
         C.INVALID_ARGUMENT, "buffer"),
    Case("detach_segment_8KB", "DetachSegment", lambda: pb.DetachSegmentRequest(segment=LONG), C.INVALID_ARGUMENT,
         "segment"),
    Case("shared_lookup_uppercase_segment", "SharedLookup",
         lambda: pb.SharedLookupRequest(table=CANARY, segment="kvstore-" + "A" * 32, ids=SHARED_IDS),
         C.INVALID_ARGUMENT, "segment"),
    Case("shared_update_absent_segment", "SharedUpdate",
         lambda: pb.SharedUpdateRequest(table=CANARY, segment=ABSENT_SEGMENT, ids=SHARED_IDS),
         C.INVALID_ARGUMENT, "segment"),
    Case("shared_gradients_no_segment", "SharedApplyGradients",
         lambda: pb.SharedApplyGradientsRequest(table=CANARY, ids=SHARED_IDS), C.INVALID_ARGUMENT, "segment"),
]

CASES = [*NAME_CASES, *CONFIG_CASES, *TENSOR_CASES, *ROW_CASES, *SNAPSHOT_CASES, *LEASE_CASES, *REPLICATION_CASES,
         *TRAINING_AND_CLUSTER_CASES, *SAME_HOST_CASES]
