from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OnMiss(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_MISS_UNSPECIFIED: _ClassVar[OnMiss]
    ON_MISS_INIT_INSERT: _ClassVar[OnMiss]
    ON_MISS_INIT: _ClassVar[OnMiss]
    ON_MISS_ZEROS: _ClassVar[OnMiss]
    ON_MISS_ERROR: _ClassVar[OnMiss]

class ImportMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMPORT_MODE_UNSPECIFIED: _ClassVar[ImportMode]
    IMPORT_MODE_MERGE: _ClassVar[ImportMode]
    IMPORT_MODE_REPLACE: _ClassVar[ImportMode]
ON_MISS_UNSPECIFIED: OnMiss
ON_MISS_INIT_INSERT: OnMiss
ON_MISS_INIT: OnMiss
ON_MISS_ZEROS: OnMiss
ON_MISS_ERROR: OnMiss
IMPORT_MODE_UNSPECIFIED: ImportMode
IMPORT_MODE_MERGE: ImportMode
IMPORT_MODE_REPLACE: ImportMode

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "align")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ALIGN_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    align: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., align: _Optional[bytes] = ...) -> None: ...

class OptimizerConfig(_message.Message):
    __slots__ = ("name", "lr", "eps", "beta1", "beta2", "weight_decay")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    eps: float
    beta1: float
    beta2: float
    weight_decay: float
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., eps: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., weight_decay: _Optional[float] = ...) -> None: ...

class InitializerConfig(_message.Message):
    __slots__ = ("kind", "scale", "seed")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    kind: str
    scale: float
    seed: int
    def __init__(self, kind: _Optional[str] = ..., scale: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class CacheConfig(_message.Message):
    __slots__ = ("rows", "ways", "policy", "write", "flush_seconds", "device", "host_rows", "host_policy")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    WAYS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WRITE_FIELD_NUMBER: _ClassVar[int]
    FLUSH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOST_ROWS_FIELD_NUMBER: _ClassVar[int]
    HOST_POLICY_FIELD_NUMBER: _ClassVar[int]
    rows: int
    ways: int
    policy: str
    write: str
    flush_seconds: float
    device: str
    host_rows: int
    host_policy: str
    def __init__(self, rows: _Optional[int] = ..., ways: _Optional[int] = ..., policy: _Optional[str] = ..., write: _Optional[str] = ..., flush_seconds: _Optional[float] = ..., device: _Optional[str] = ..., host_rows: _Optional[int] = ..., host_policy: _Optional[str] = ...) -> None: ...

class EvictionConfig(_message.Message):
    __slots__ = ("ttl_seconds", "max_rows", "headroom", "capacity_policy", "samples", "min_norm", "min_count", "sketch_width", "decay_rate", "count_threshold", "archive_seconds", "interval_seconds", "trigger_rows", "trigger_bytes", "touch_seconds")
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    HEADROOM_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_POLICY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MIN_NORM_FIELD_NUMBER: _ClassVar[int]
    MIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    SKETCH_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DECAY_RATE_FIELD_NUMBER: _ClassVar[int]
    COUNT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ARCHIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_ROWS_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOUCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ttl_seconds: float
    max_rows: int
    headroom: float
    capacity_policy: str
    samples: int
    min_norm: float
    min_count: int
    sketch_width: int
    decay_rate: float
    count_threshold: int
    archive_seconds: float
    interval_seconds: float
    trigger_rows: int
    trigger_bytes: int
    touch_seconds: float
    def __init__(self, ttl_seconds: _Optional[float] = ..., max_rows: _Optional[int] = ..., headroom: _Optional[float] = ..., capacity_policy: _Optional[str] = ..., samples: _Optional[int] = ..., min_norm: _Optional[float] = ..., min_count: _Optional[int] = ..., sketch_width: _Optional[int] = ..., decay_rate: _Optional[float] = ..., count_threshold: _Optional[int] = ..., archive_seconds: _Optional[float] = ..., interval_seconds: _Optional[float] = ..., trigger_rows: _Optional[int] = ..., trigger_bytes: _Optional[int] = ..., touch_seconds: _Optional[float] = ...) -> None: ...

class TableConfig(_message.Message):
    __slots__ = ("name", "dim", "dtype", "optimizer", "initializer", "cache", "allow_nonfinite", "eviction")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    INITIALIZER_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_NONFINITE_FIELD_NUMBER: _ClassVar[int]
    EVICTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    dtype: str
    optimizer: OptimizerConfig
    initializer: InitializerConfig
    cache: CacheConfig
    allow_nonfinite: bool
    eviction: EvictionConfig
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., dtype: _Optional[str] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ..., initializer: _Optional[_Union[InitializerConfig, _Mapping]] = ..., cache: _Optional[_Union[CacheConfig, _Mapping]] = ..., allow_nonfinite: _Optional[bool] = ..., eviction: _Optional[_Union[EvictionConfig, _Mapping]] = ...) -> None: ...

class CreateTableRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: TableConfig
    def __init__(self, config: _Optional[_Union[TableConfig, _Mapping]] = ...) -> None: ...

class CreateTableResponse(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: TableConfig
    def __init__(self, config: _Optional[_Union[TableConfig, _Mapping]] = ...) -> None: ...

class DropTableRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class DropTableResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTablesResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tables: _Optional[_Iterable[str]] = ...) -> None: ...

class DescribeTableRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class DescribeTableResponse(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: TableConfig
    def __init__(self, config: _Optional[_Union[TableConfig, _Mapping]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("table", "ids", "on_miss", "with_state", "lease")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ON_MISS_FIELD_NUMBER: _ClassVar[int]
    WITH_STATE_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    on_miss: OnMiss
    with_state: bool
    lease: str
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., on_miss: _Optional[_Union[OnMiss, str]] = ..., with_state: _Optional[bool] = ..., lease: _Optional[str] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("weights", "state")
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    weights: Tensor
    state: Tensor
    def __init__(self, weights: _Optional[_Union[Tensor, _Mapping]] = ..., state: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("table", "ids", "weights", "state", "scores", "idempotency_key", "last")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    weights: Tensor
    state: Tensor
    scores: Tensor
    idempotency_key: str
    last: bool
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., state: _Optional[_Union[Tensor, _Mapping]] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., last: _Optional[bool] = ...) -> None: ...

class UpdateResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    def __init__(self, rows: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("table", "ids", "idempotency_key", "last")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    idempotency_key: str
    last: bool
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., idempotency_key: _Optional[str] = ..., last: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    def __init__(self, rows: _Optional[int] = ...) -> None: ...

class ApplyGradientsRequest(_message.Message):
    __slots__ = ("table", "ids", "grads", "owner", "scores", "idempotency_key", "last")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    grads: Tensor
    owner: str
    scores: Tensor
    idempotency_key: str
    last: bool
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., grads: _Optional[_Union[Tensor, _Mapping]] = ..., owner: _Optional[str] = ..., scores: _Optional[_Union[Tensor, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., last: _Optional[bool] = ...) -> None: ...

class ApplyGradientsResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    def __init__(self, rows: _Optional[int] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("table", "ids", "lock", "owner")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOCK_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    lock: bool
    owner: str
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., lock: _Optional[bool] = ..., owner: _Optional[str] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("cached",)
    CACHED_FIELD_NUMBER: _ClassVar[int]
    cached: int
    def __init__(self, cached: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("table", "ids", "owner")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    owner: str
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., owner: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class GrantLeaseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GrantLeaseResponse(_message.Message):
    __slots__ = ("lease", "ttl_seconds")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease: str
    ttl_seconds: float
    def __init__(self, lease: _Optional[str] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: str
    def __init__(self, lease: _Optional[str] = ...) -> None: ...

class KeepAliveResponse(_message.Message):
    __slots__ = ("ttl_seconds",)
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ttl_seconds: float
    def __init__(self, ttl_seconds: _Optional[float] = ...) -> None: ...

class RevokeLeaseRequest(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: str
    def __init__(self, lease: _Optional[str] = ...) -> None: ...

class RevokeLeaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("evicted",)
    class EvictedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    evicted: _containers.ScalarMap[str, int]
    def __init__(self, evicted: _Optional[_Mapping[str, int]] = ...) -> None: ...

class RestoreRowsRequest(_message.Message):
    __slots__ = ("table", "ids")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ...) -> None: ...

class RestoreRowsResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    def __init__(self, rows: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("table", "counters")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TABLE_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    table: str
    counters: _containers.ScalarMap[str, float]
    def __init__(self, table: _Optional[str] = ..., counters: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("name", "created_at", "tables", "rows", "format_version", "pause_seconds", "duration_seconds")
    class RowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAUSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    created_at: float
    tables: _containers.RepeatedCompositeFieldContainer[TableConfig]
    rows: _containers.ScalarMap[str, int]
    format_version: int
    pause_seconds: float
    duration_seconds: float
    def __init__(self, name: _Optional[str] = ..., created_at: _Optional[float] = ..., tables: _Optional[_Iterable[_Union[TableConfig, _Mapping]]] = ..., rows: _Optional[_Mapping[str, int]] = ..., format_version: _Optional[int] = ..., pause_seconds: _Optional[float] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CreateSnapshotResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: SnapshotInfo
    def __init__(self, snapshot: _Optional[_Union[SnapshotInfo, _Mapping]] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotInfo]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[SnapshotInfo, _Mapping]]] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RestoreSnapshotRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RestoreSnapshotResponse(_message.Message):
    __slots__ = ("snapshot", "duration_seconds")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    snapshot: SnapshotInfo
    duration_seconds: float
    def __init__(self, snapshot: _Optional[_Union[SnapshotInfo, _Mapping]] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("table", "chunk_rows", "since_sequence")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ROWS_FIELD_NUMBER: _ClassVar[int]
    SINCE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    table: str
    chunk_rows: int
    since_sequence: int
    def __init__(self, table: _Optional[str] = ..., chunk_rows: _Optional[int] = ..., since_sequence: _Optional[int] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("config", "estimated_rows", "ids", "weights", "state", "meta", "sequence", "since_sequence", "tombstones", "feed_id")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_ROWS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SINCE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TOMBSTONES_FIELD_NUMBER: _ClassVar[int]
    FEED_ID_FIELD_NUMBER: _ClassVar[int]
    config: TableConfig
    estimated_rows: int
    ids: bytes
    weights: Tensor
    state: Tensor
    meta: Tensor
    sequence: int
    since_sequence: int
    tombstones: bytes
    feed_id: str
    def __init__(self, config: _Optional[_Union[TableConfig, _Mapping]] = ..., estimated_rows: _Optional[int] = ..., ids: _Optional[bytes] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., state: _Optional[_Union[Tensor, _Mapping]] = ..., meta: _Optional[_Union[Tensor, _Mapping]] = ..., sequence: _Optional[int] = ..., since_sequence: _Optional[int] = ..., tombstones: _Optional[bytes] = ..., feed_id: _Optional[str] = ...) -> None: ...

class ImportRequest(_message.Message):
    __slots__ = ("table", "mode", "config", "ids", "weights", "state", "meta", "idempotency_key", "last")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    table: str
    mode: ImportMode
    config: TableConfig
    ids: bytes
    weights: Tensor
    state: Tensor
    meta: Tensor
    idempotency_key: str
    last: bool
    def __init__(self, table: _Optional[str] = ..., mode: _Optional[_Union[ImportMode, str]] = ..., config: _Optional[_Union[TableConfig, _Mapping]] = ..., ids: _Optional[bytes] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., state: _Optional[_Union[Tensor, _Mapping]] = ..., meta: _Optional[_Union[Tensor, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., last: _Optional[bool] = ...) -> None: ...

class ImportChainRequest(_message.Message):
    __slots__ = ("rows", "sequence", "since_sequence", "tombstones")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SINCE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TOMBSTONES_FIELD_NUMBER: _ClassVar[int]
    rows: ImportRequest
    sequence: int
    since_sequence: int
    tombstones: bytes
    def __init__(self, rows: _Optional[_Union[ImportRequest, _Mapping]] = ..., sequence: _Optional[int] = ..., since_sequence: _Optional[int] = ..., tombstones: _Optional[bytes] = ...) -> None: ...

class ImportResponse(_message.Message):
    __slots__ = ("rows", "created")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    rows: int
    created: bool
    def __init__(self, rows: _Optional[int] = ..., created: _Optional[bool] = ...) -> None: ...

class ClusterManifest(_message.Message):
    __slots__ = ("cluster_id", "shards", "function", "block_size", "shard_index", "format_version")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    shards: int
    function: str
    block_size: int
    shard_index: int
    format_version: int
    def __init__(self, cluster_id: _Optional[str] = ..., shards: _Optional[int] = ..., function: _Optional[str] = ..., block_size: _Optional[int] = ..., shard_index: _Optional[int] = ..., format_version: _Optional[int] = ...) -> None: ...

class GetClusterManifestRequest(_message.Message):
    __slots__ = ("expected",)
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    expected: ClusterManifest
    def __init__(self, expected: _Optional[_Union[ClusterManifest, _Mapping]] = ...) -> None: ...

class GetClusterManifestResponse(_message.Message):
    __slots__ = ("present", "manifest")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    present: bool
    manifest: ClusterManifest
    def __init__(self, present: _Optional[bool] = ..., manifest: _Optional[_Union[ClusterManifest, _Mapping]] = ...) -> None: ...

class SetClusterManifestRequest(_message.Message):
    __slots__ = ("manifest", "replace")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    manifest: ClusterManifest
    replace: bool
    def __init__(self, manifest: _Optional[_Union[ClusterManifest, _Mapping]] = ..., replace: _Optional[bool] = ...) -> None: ...

class SetClusterManifestResponse(_message.Message):
    __slots__ = ("manifest",)
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    manifest: ClusterManifest
    def __init__(self, manifest: _Optional[_Union[ClusterManifest, _Mapping]] = ...) -> None: ...

class TableRows(_message.Message):
    __slots__ = ("table", "ids", "values", "shared_ids", "shared_values")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SHARED_IDS_FIELD_NUMBER: _ClassVar[int]
    SHARED_VALUES_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    values: Tensor
    shared_ids: SharedArray
    shared_values: SharedArray
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., shared_ids: _Optional[_Union[SharedArray, _Mapping]] = ..., shared_values: _Optional[_Union[SharedArray, _Mapping]] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("gradients", "lookups", "on_miss", "more", "prefetches", "segment")
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    ON_MISS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    PREFETCHES_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    gradients: _containers.RepeatedCompositeFieldContainer[TableRows]
    lookups: _containers.RepeatedCompositeFieldContainer[TableRows]
    on_miss: OnMiss
    more: bool
    prefetches: _containers.RepeatedCompositeFieldContainer[TableRows]
    segment: str
    def __init__(self, gradients: _Optional[_Iterable[_Union[TableRows, _Mapping]]] = ..., lookups: _Optional[_Iterable[_Union[TableRows, _Mapping]]] = ..., on_miss: _Optional[_Union[OnMiss, str]] = ..., more: _Optional[bool] = ..., prefetches: _Optional[_Iterable[_Union[TableRows, _Mapping]]] = ..., segment: _Optional[str] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("rows", "stepped", "more")
    class SteppedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ROWS_FIELD_NUMBER: _ClassVar[int]
    STEPPED_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[TableRows]
    stepped: _containers.ScalarMap[str, int]
    more: bool
    def __init__(self, rows: _Optional[_Iterable[_Union[TableRows, _Mapping]]] = ..., stepped: _Optional[_Mapping[str, int]] = ..., more: _Optional[bool] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("tables", "from_sequence", "weights_only", "interval_seconds", "feed_id")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_ONLY_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FEED_ID_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    from_sequence: int
    weights_only: bool
    interval_seconds: float
    feed_id: str
    def __init__(self, tables: _Optional[_Iterable[str]] = ..., from_sequence: _Optional[int] = ..., weights_only: _Optional[bool] = ..., interval_seconds: _Optional[float] = ..., feed_id: _Optional[str] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("table", "ids", "weights", "state", "tombstones", "sequence", "batch_end", "head_sequence", "oldest_change_time", "feed_id", "table_dropped")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOMBSTONES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BATCH_END_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    OLDEST_CHANGE_TIME_FIELD_NUMBER: _ClassVar[int]
    FEED_ID_FIELD_NUMBER: _ClassVar[int]
    TABLE_DROPPED_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    weights: Tensor
    state: Tensor
    tombstones: bytes
    sequence: int
    batch_end: bool
    head_sequence: int
    oldest_change_time: float
    feed_id: str
    table_dropped: bool
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., state: _Optional[_Union[Tensor, _Mapping]] = ..., tombstones: _Optional[bytes] = ..., sequence: _Optional[int] = ..., batch_end: _Optional[bool] = ..., head_sequence: _Optional[int] = ..., oldest_change_time: _Optional[float] = ..., feed_id: _Optional[str] = ..., table_dropped: _Optional[bool] = ...) -> None: ...

class SharedArray(_message.Message):
    __slots__ = ("dtype", "shape", "offset", "device_buffer")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BUFFER_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    device_buffer: str
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., device_buffer: _Optional[str] = ...) -> None: ...

class AttachSegmentRequest(_message.Message):
    __slots__ = ("segment", "token")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    segment: str
    token: bytes
    def __init__(self, segment: _Optional[str] = ..., token: _Optional[bytes] = ...) -> None: ...

class AttachSegmentResponse(_message.Message):
    __slots__ = ("attached", "reason", "doorbell")
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DOORBELL_FIELD_NUMBER: _ClassVar[int]
    attached: bool
    reason: str
    doorbell: str
    def __init__(self, attached: _Optional[bool] = ..., reason: _Optional[str] = ..., doorbell: _Optional[str] = ...) -> None: ...

class DetachSegmentRequest(_message.Message):
    __slots__ = ("segment",)
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    segment: str
    def __init__(self, segment: _Optional[str] = ...) -> None: ...

class AttachDeviceBufferRequest(_message.Message):
    __slots__ = ("buffer", "handle", "size", "device_uuid", "token")
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    buffer: str
    handle: bytes
    size: int
    device_uuid: bytes
    token: bytes
    def __init__(self, buffer: _Optional[str] = ..., handle: _Optional[bytes] = ..., size: _Optional[int] = ..., device_uuid: _Optional[bytes] = ..., token: _Optional[bytes] = ...) -> None: ...

class DetachSegmentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SharedLookupRequest(_message.Message):
    __slots__ = ("table", "segment", "ids", "weights", "state", "on_miss", "lease")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ON_MISS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    table: str
    segment: str
    ids: SharedArray
    weights: SharedArray
    state: SharedArray
    on_miss: OnMiss
    lease: str
    def __init__(self, table: _Optional[str] = ..., segment: _Optional[str] = ..., ids: _Optional[_Union[SharedArray, _Mapping]] = ..., weights: _Optional[_Union[SharedArray, _Mapping]] = ..., state: _Optional[_Union[SharedArray, _Mapping]] = ..., on_miss: _Optional[_Union[OnMiss, str]] = ..., lease: _Optional[str] = ...) -> None: ...

class SharedLookupResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    def __init__(self, rows: _Optional[int] = ...) -> None: ...

class SharedUpdateRequest(_message.Message):
    __slots__ = ("table", "segment", "ids", "weights", "state", "scores", "idempotency_key")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    table: str
    segment: str
    ids: SharedArray
    weights: SharedArray
    state: SharedArray
    scores: SharedArray
    idempotency_key: str
    def __init__(self, table: _Optional[str] = ..., segment: _Optional[str] = ..., ids: _Optional[_Union[SharedArray, _Mapping]] = ..., weights: _Optional[_Union[SharedArray, _Mapping]] = ..., state: _Optional[_Union[SharedArray, _Mapping]] = ..., scores: _Optional[_Union[SharedArray, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SharedApplyGradientsRequest(_message.Message):
    __slots__ = ("table", "segment", "ids", "grads", "scores", "owner", "idempotency_key")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    table: str
    segment: str
    ids: SharedArray
    grads: SharedArray
    scores: SharedArray
    owner: str
    idempotency_key: str
    def __init__(self, table: _Optional[str] = ..., segment: _Optional[str] = ..., ids: _Optional[_Union[SharedArray, _Mapping]] = ..., grads: _Optional[_Union[SharedArray, _Mapping]] = ..., scores: _Optional[_Union[SharedArray, _Mapping]] = ..., owner: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...
