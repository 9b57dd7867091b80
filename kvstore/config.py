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

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
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
            value = getattr(self, name)
            _finite_nonneg(value, f"optimizer.{name}")
            if value >= 1:
                raise InvalidArgument(f"optimizer.{name}: must be in [0, 1), got {value!r}")

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

    def __post_init__(self):
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise InvalidArgument(f"cache.device: expected 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not isinstance(self.ways, int) or not 1 <= self.ways <= 64:
            raise InvalidArgument(f"cache.ways: must be in [1, 64], got {self.ways!r}")
        if not isinstance(self.rows, int) or self.rows < self.ways or self.rows > 1 << 34:
            raise InvalidArgument(f"cache.rows: must be in [cache.ways, 2**34], got {self.rows!r}")
        if self.rows % self.ways:
            raise InvalidArgument(f"cache.rows must be a multiple of cache.ways ({self.ways})")
        if self.policy not in ("lru", "lfu"):
            raise InvalidArgument(f"cache.policy: expected 'lru' or 'lfu', got {self.policy!r}")
        if self.write not in ("write_back", "write_through"):
            raise InvalidArgument(
                f"cache.write: expected 'write_back' or 'write_through', got {self.write!r}"
            )


@dataclass(frozen=True)
class TableConfig:
    name: str
    dim: int
    dtype: str = "float32"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    initializer: InitializerConfig = field(default_factory=InitializerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    allow_nonfinite: bool = False

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
        nested = {"optimizer": OptimizerConfig, "initializer": InitializerConfig, "cache": CacheConfig}
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


@dataclass(frozen=True)
class RocksConfig:
    """The RocksDB tier of one store."""

    block_cache_bytes: int = 256 << 20   # LRU block cache: the DRAM tier under the cache
    bloom_bits_per_key: float = 10.0
    write_buffer_bytes: int = 64 << 20
    max_background_jobs: int = 4
    durability: Literal["none", "wal", "sync"] = "wal"
    read_threads: int = 4                # parallel multi-get for large batches

    def __post_init__(self):
        if self.durability not in ("none", "wal", "sync"):
            raise InvalidArgument(
                f"durability: expected 'none', 'wal' or 'sync', got {self.durability!r}"
            )
        for name in ("block_cache_bytes", "write_buffer_bytes", "max_background_jobs", "read_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"rocksdb.{name}: must be a positive integer, got {value!r}")
