"""Configuration of one server: a frozen dataclass, loaded from YAML, overridden by flags."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kvstore import RocksConfig, SweeperConfig
from kvstore.errors import InvalidArgument


@dataclass(frozen=True)
class ServerConfig:
    data_dir: str = "./kvstore-data"
    host: str = "127.0.0.1"              # loopback unless told otherwise
    port: int = 50051                    # 0 = any free port (the bound one is printed)
    metrics_port: int = 0                # Prometheus HTTP port; 0 = off
    max_message_bytes: int = 16 << 20    # gRPC send/receive limit
    max_workers: int = 16                # handler threads
    max_concurrent_rpcs: int = 64        # further calls get RESOURCE_EXHAUSTED
    grace_seconds: float = 10.0          # in-flight calls may finish this long on shutdown
    max_request_rows: int = 1 << 22      # rows in one Update/Delete call, all chunks together
    max_chunk_rows: int = 1 << 20        # rows in one message of a stream
    rocksdb: RocksConfig = field(default_factory=RocksConfig)
    sweeper: SweeperConfig = field(default_factory=SweeperConfig)   # background eviction

    def __post_init__(self):
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= 65535:
                raise InvalidArgument(f"{name}: must be an integer in [0, 65535], got {value!r}")
        for name in ("max_message_bytes", "max_workers", "max_concurrent_rpcs",
                     "max_request_rows", "max_chunk_rows"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise InvalidArgument(f"{name}: must be a positive integer, got {value!r}")
        if not isinstance(self.grace_seconds, (int, float)) or not 0 <= self.grace_seconds <= 3600:
            raise InvalidArgument(f"grace_seconds: must be a number in [0, 3600], got {self.grace_seconds!r}")
        for name in ("data_dir", "host"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InvalidArgument(f"{name}: must be a non-empty string")
        if not isinstance(self.rocksdb, RocksConfig):
            raise InvalidArgument("rocksdb: must be a mapping of RocksDB settings")
        if not isinstance(self.sweeper, SweeperConfig):
            raise InvalidArgument("sweeper: must be a mapping of eviction sweeper settings")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ServerConfig:
        """Build from plain data; unknown keys are an error naming the key."""
        if not isinstance(raw, dict):
            raise InvalidArgument("config: must be a mapping")
        raw = dict(raw)
        _check_keys(cls, raw, "")
        rocks = raw.get("rocksdb")
        if isinstance(rocks, dict):
            _check_keys(RocksConfig, rocks, "rocksdb.")
            raw["rocksdb"] = RocksConfig(**rocks)
        sweeper = raw.get("sweeper")
        if isinstance(sweeper, dict):
            _check_keys(SweeperConfig, sweeper, "sweeper.")
            raw["sweeper"] = SweeperConfig(**sweeper)
        return cls(**raw)

    @classmethod
    def load(cls, path: str | None, overrides: dict[str, Any]) -> ServerConfig:
        """Defaults, then the YAML file at `path` (if any), then `overrides` (None = not given)."""
        raw: dict[str, Any] = {}
        if path:
            import yaml

            try:
                with open(path) as handle:
                    raw = yaml.safe_load(handle) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise InvalidArgument(f"config: cannot read {path}: {exc}") from None
            if not isinstance(raw, dict):
                raise InvalidArgument(f"config: {path} must hold a mapping")
        raw.update({key: value for key, value in overrides.items() if value is not None})
        return cls.from_dict(raw)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(kind: type, raw: dict[str, Any], prefix: str) -> None:
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(kind)})
    if unknown:
        raise InvalidArgument(f"{prefix}{unknown[0]}: unknown config key")
