"""Configuration of tables and of the store: one frozen dataclass per component.

Configs are validated once, on construction, and persist with the data as JSON.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .dtypes import weight_dtype
from .errors import InvalidArgument
from .row_threads import usable_cpus

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")     # where a cache lives: host memory, or a GPU
MAX_DIM = 65536
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam", "partial_rowwise_adam")
INITIALIZERS = ("uniform", "normal", "zeros")


def validate_name(name: str, field_name: str = "name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"{field_name}: {name!r} must match {NAME_PATTERN.pattern}"
        )
    return name


def _finite_nonneg(value: float, field_name: str) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{field_name}: must be a finite number >= 0, got {value!r}")


def _unit_interval(value: float, field_name: str) -> None:
    """A rate or fraction in [0, 1)."""
    _finite_nonneg(value, field_name)
    if value >= 1:
        raise InvalidArgument(f"{field_name}: must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.01
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise InvalidArgument(
                f"optimizer.name: unknown optimizer {self.name!r}; expected one of {list(OPTIMIZERS)}"
            )
        for name in ("lr", "eps", "weight_decay"):
            _finite_nonneg(getattr(self, name), f"optimizer.{name}")
        for name in ("beta1", "beta2"):
            _unit_interval(getattr(self, name), f"optimizer.{name}")

    def state_dim(self, dim: int) -> int:
        """float32 values of optimizer state stored beside each row's weights."""
        return {
            "sgd": 0,
            "adagrad": dim,
            "rowwise_adagrad": 1,
            "adam": 2 * dim,
            "partial_rowwise_adam": dim + 1,
        }[self.name]


@dataclass(frozen=True)
class InitializerConfig:
    kind: str = "uniform"
    scale: float = 0.01
    seed: int = 0

    def __post_init__(self):
        if self.kind not in INITIALIZERS:
            raise InvalidArgument(
                f"initializer.kind: unknown initializer {self.kind!r}; expected one of {list(INITIALIZERS)}"
            )
        _finite_nonneg(self.scale, "initializer.scale")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise InvalidArgument(f"initializer.seed: must be an integer in [0, 2**64), got {self.seed!r}")


@dataclass(frozen=True)
class CacheConfig:
    rows: int = 1 << 16           # slots in the cache tier
    ways: int = 32                # associativity: one warp probes one set
    policy: Literal["lru", "lfu"] = "lru"
    write: Literal["write_back", "write_through"] = "write_back"
    device: str = "cpu"           # where the cache lives: "cpu" (host memory) or "cuda:N" (GPU memory)
    flush_seconds: float = 1.0    # write_back: dirty rows reach RocksDB at least this often
    host_rows: int = 0            # with a GPU device: slots of a host-memory tier under it (0 = none)
    host_policy: Literal["lru", "lfu"] = "lru"   # victim order of that host tier

    def __post_init__(self):
        if (isinstance(self.flush_seconds, bool) or not isinstance(self.flush_seconds, (int, float))
                or not math.isfinite(self.flush_seconds) or not 0 < self.flush_seconds <= 86400):
            raise InvalidArgument(f"cache.flush_seconds: must be a number in (0, 86400], got {self.flush_seconds!r}")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise InvalidArgument(f"cache.device: expected 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not isinstance(self.ways, int) or not 1 <= self.ways <= 64:
            raise InvalidArgument(f"cache.ways: must be in [1, 64], got {self.ways!r}")
        if not isinstance(self.rows, int) or self.rows < self.ways or self.rows > 1 << 34:
            raise InvalidArgument(f"cache.rows: must be in [cache.ways, 2**34], got {self.rows!r}")
        if self.rows % self.ways:
            raise InvalidArgument(f"cache.rows must be a multiple of cache.ways ({self.ways})")
        if self.rows // self.ways > 1 << 32:
            raise InvalidArgument(
                f"cache.rows: at most 2**32 sets of cache.ways ({self.ways}) slots, got {self.rows!r}"
            )
        if self.policy not in ("lru", "lfu"):
            raise InvalidArgument(f"cache.policy: expected 'lru' or 'lfu', got {self.policy!r}")
        if self.write not in ("write_back", "write_through"):
            raise InvalidArgument(
                f"cache.write: expected 'write_back' or 'write_through', got {self.write!r}"
            )
        self._check_host_tier()

    def _check_host_tier(self) -> None:
        if isinstance(self.host_rows, bool) or not isinstance(self.host_rows, int) or self.host_rows < 0:
            raise InvalidArgument(f"cache.host_rows: must be an integer >= 0, got {self.host_rows!r}")
        if self.host_rows and self.device == "cpu":
            raise InvalidArgument("cache.host_rows: a host tier goes under a GPU tier; set cache.device to "
                                  "'cuda' or 'cuda:N', or leave host_rows at 0")
        if self.host_rows % HOST_TIER_WAYS or self.host_rows > 1 << 34:
            raise InvalidArgument(f"cache.host_rows: must be a multiple of {HOST_TIER_WAYS} up to 2**34, "
                                  f"got {self.host_rows!r}")
        if self.host_policy not in ("lru", "lfu"):
            raise InvalidArgument(f"cache.host_policy: expected 'lru' or 'lfu', got {self.host_policy!r}")

    def host_tier(self) -> CacheConfig | None:
        """The config of the host tier under a GPU tier, or None."""
        if not self.host_rows:
            return None
        return CacheConfig(rows=self.host_rows, ways=HOST_TIER_WAYS, policy=self.host_policy, write=self.write,
                           flush_seconds=self.flush_seconds)


HOST_TIER_WAYS = 32
CAPACITY_POLICIES = ("lru", "lfu", "score")


def _nonneg_int(value: int, field_name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{field_name}: must be an integer >= 0, got {value!r}")


@dataclass(frozen=True)
class EvictionConfig:
    """Store eviction of one table: which cold rows leave the store, and when the sweeper looks.

    Every rule is off at its zero value; rules combine (a row leaves when any rule selects it).
    """

    ttl_seconds: float = 0.0          # rows not accessed for this long leave
    max_rows: int = 0                 # capacity: above it, sampled worst rows leave ...
    headroom: float = 0.05            # ... until the table holds max_rows * (1 - headroom)
    capacity_policy: str = "lru"      # lru | lfu | score: which of the sampled candidates is worst
    samples: int = 16                 # candidates per pick (worst of N random rows, as Redis does)
    min_norm: float = 0.0             # rows whose weights' L2 norm is below this leave
    min_count: int = 0                # admission: an id is stored once seen this many times (0, 1: off)
    sketch_width: int = 1 << 16       # counters per row of the admission count-min sketch (4 rows)
    decay_rate: float = 0.0           # fraction of each row's access count removed at every sweep
    count_threshold: int = 0          # rows whose (decayed) access count is below this leave
    archive_seconds: float = 0.0      # evicted rows stay restorable this long (0: deleted outright)
    interval_seconds: float = 0.0     # the sweeper runs the table this often (0: not by time)
    trigger_rows: int = 0             # ... or when it holds more rows (0: max_rows less half the headroom)
    trigger_bytes: int = 0            # ... or when its live SST files exceed this many bytes (0: off)
    touch_seconds: float = 60.0       # a read-only access reaches RocksDB once it moved last_access this far

    def __post_init__(self):
        for name in ("ttl_seconds", "min_norm", "archive_seconds", "interval_seconds", "touch_seconds"):
            _finite_nonneg(getattr(self, name), f"eviction.{name}")
        for name in ("max_rows", "min_count", "count_threshold", "trigger_rows", "trigger_bytes"):
            _nonneg_int(getattr(self, name), f"eviction.{name}")
        for name in ("headroom", "decay_rate"):
            _unit_interval(getattr(self, name), f"eviction.{name}")
        if self.capacity_policy not in CAPACITY_POLICIES:
            raise InvalidArgument(
                f"eviction.capacity_policy: expected one of {list(CAPACITY_POLICIES)}, got {self.capacity_policy!r}"
            )
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or not 1 <= self.samples <= 1024:
            raise InvalidArgument(f"eviction.samples: must be an integer in [1, 1024], got {self.samples!r}")
        if isinstance(self.sketch_width, bool) or not isinstance(self.sketch_width, int) \
                or not 64 <= self.sketch_width <= 1 << 26:
            raise InvalidArgument(
                f"eviction.sketch_width: must be an integer in [64, 2**26], got {self.sketch_width!r}"
            )

    @property
    def target_rows(self) -> int:
        """Rows a capacity sweep leaves in the table."""
        return int(self.max_rows * (1 - self.headroom))

    @property
    def row_trigger(self) -> int:
        """Row count above which the sweeper runs the table (0: never by row count)."""
        if self.trigger_rows:
            return self.trigger_rows
        return (self.max_rows + self.target_rows) // 2 if self.max_rows else 0

    @property
    def sweeps(self) -> bool:
        """Whether any rule can evict a row."""
        return bool(self.ttl_seconds or self.max_rows or self.min_norm or self.count_threshold)


@dataclass(frozen=True)
class SweeperConfig:
    """The background eviction sweeper of one store."""

    enabled: bool = True
    rows_per_second: float = 25_000.0    # rows scanned per second across the store's tables (see docs/benchmarks.md)
    poll_seconds: float = 1.0            # how often triggers are checked
    chunk_rows: int = 1024               # rows judged at a time (short, so lookups wait little)

    def __post_init__(self):
        if not isinstance(self.rows_per_second, (int, float)) or not math.isfinite(self.rows_per_second) \
                or self.rows_per_second <= 0:
            raise InvalidArgument(f"sweeper.rows_per_second: must be a finite number > 0, got {self.rows_per_second!r}")
        _finite_nonneg(self.poll_seconds, "sweeper.poll_seconds")
        if self.poll_seconds <= 0:
            raise InvalidArgument("sweeper.poll_seconds: must be > 0")
        if isinstance(self.chunk_rows, bool) or not isinstance(self.chunk_rows, int) or self.chunk_rows < 1:
            raise InvalidArgument(f"sweeper.chunk_rows: must be a positive integer, got {self.chunk_rows!r}")


@dataclass(frozen=True)
class TableConfig:
    name: str
    dim: int
    dtype: str = "float32"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    initializer: InitializerConfig = field(default_factory=InitializerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    allow_nonfinite: bool = False
    eviction: EvictionConfig = field(default_factory=EvictionConfig)

    def __post_init__(self):
        validate_name(self.name, "name")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or not 1 <= self.dim <= MAX_DIM:
            raise InvalidArgument(f"dim: must be an integer in [1, {MAX_DIM}], got {self.dim!r}")
        weight_dtype(self.dtype, "dtype")

    @property
    def state_dim(self) -> int:
        return self.optimizer.state_dim(self.dim)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TableConfig:
        """Build from plain data (JSON, YAML, protobuf); unknown keys are an error naming the key."""
        raw = dict(raw)
        nested = {"optimizer": OptimizerConfig, "initializer": InitializerConfig, "cache": CacheConfig,
                  "eviction": EvictionConfig}
        for key, kind in nested.items():
            value = raw.get(key)
            if isinstance(value, dict):
                raw[key] = _build(kind, value, key)
        return _build(cls, raw, "")


def _build(kind: type, raw: dict[str, Any], prefix: str):
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise InvalidArgument(f"{where}{unknown[0]}: unknown config key")
    try:
        return kind(**raw)
    except TypeError as exc:
        raise InvalidArgument(f"{prefix or 'config'}: {exc}") from None


def default_read_threads() -> int:
    """RocksDB read threads: 4, capped by the CPUs this process may use."""
    return min(4, usable_cpus())


COMPRESSIONS = ("none", "snappy", "lz4", "zstd")     # RocksConfig.compression, as rocksdict names them


@dataclass(frozen=True)
class RocksConfig:
    """The RocksDB tier of one store."""

    block_cache_bytes: int = 256 << 20   # LRU block cache: the DRAM tier under the cache
    bloom_bits_per_key: float = 10.0
    write_buffer_bytes: int = 64 << 20
    max_background_jobs: int = 4
    durability: Literal["none", "wal", "sync"] = "wal"
    # parallel multi-get for large batches: 4, or fewer on a host (or container) with fewer CPUs;
    # four readers on 2 CPUs served cold lookups 7-18% slower than two (docs/benchmarks.md, stop 27)
    read_threads: int = field(default_factory=lambda: default_read_threads())
    row_cache_bytes: int = 0             # RocksDB's row cache (0: none): rows, not blocks, for point reads
    # block compression of SST files (flushes, compactions, imports): rows of trained floats do not
    # compress, so by default no block is tried (a snappy attempt costs an import 0.15 µs a row)
    compression: Literal["none", "snappy", "lz4", "zstd"] = "none"
    # point reads straight from memory-mapped SST files: no read() call and no copy per block
    # (less CPU per row read from RocksDB); a disk read error then ends the process (SIGBUS)
    mmap_reads: bool = False
    # point reads check each data block's checksum as they read it from a file (RocksDB's default).
    # Off: a cold row costs less CPU, but a block corrupted on disk is returned as it reads
    verify_checksums: bool = True

    def __post_init__(self):
        if self.durability not in ("none", "wal", "sync"):
            raise InvalidArgument(
                f"durability: expected 'none', 'wal' or 'sync', got {self.durability!r}"
            )
        for name in ("block_cache_bytes", "write_buffer_bytes", "max_background_jobs", "read_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"rocksdb.{name}: must be a positive integer, got {value!r}")
        if not isinstance(self.row_cache_bytes, int) or self.row_cache_bytes < 0:
            raise InvalidArgument(f"rocksdb.row_cache_bytes: must be 0 (no row cache) or a positive integer, "
                                  f"got {self.row_cache_bytes!r}")
        for name in ("mmap_reads", "verify_checksums"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument(f"rocksdb.{name}: must be true or false, got {getattr(self, name)!r}")
        if self.compression not in COMPRESSIONS:
            raise InvalidArgument(f"rocksdb.compression: expected one of {list(COMPRESSIONS)}, "
                                  f"got {self.compression!r}")
