"""Configuration of one server: a frozen dataclass, resolved from four sources.

Precedence, highest first: command-line flags, `KVSTORE_*` environment
variables, the YAML file (`--config` or `KVSTORE_CONFIG`), the defaults below.
Every key has all three spellings: `max_workers` in YAML, `KVSTORE_MAX_WORKERS`,
`--max-workers`; RocksDB and sweeper keys nest under `rocksdb:` and `sweeper:` and
read `KVSTORE_ROCKSDB_DURABILITY`, `--rocksdb-durability`. Unknown keys and unknown
`KVSTORE_*` variables are errors naming them, except the `kvstore` client's own
variables (CLIENT_VARIABLES), so a server starts from a shell set up for the client.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvstore import RocksConfig, SweeperConfig
from kvstore.config import DEVICE_PATTERN
from kvstore.errors import InvalidArgument
from kvstore.row_threads import MAX_THREADS as MAX_HOST_THREADS

from .replica import ReplicationConfig

ENV_PREFIX = "KVSTORE_"
ENV_CONFIG = "KVSTORE_CONFIG"          # names the YAML file, like --config
NESTED = {"rocksdb": RocksConfig, "sweeper": SweeperConfig, "replication": ReplicationConfig}
# the `kvstore` command's connection variables (kvstore_client.cli.ENVIRONMENT): not server keys, not errors
CLIENT_VARIABLES = frozenset({"KVSTORE_ADDRESS", "KVSTORE_TOKEN", "KVSTORE_TOKEN_FILE", "KVSTORE_TLS_CA"})
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


@dataclass(frozen=True)
class ServerConfig:
    data_dir: str = "./kvstore-data"
    host: str = "127.0.0.1"              # loopback unless told otherwise
    port: int = 50051                    # 0 = any free port (the bound one is printed)
    metrics_port: int = 0                # Prometheus HTTP port; 0 = off
    metrics_host: str = "127.0.0.1"      # address the metrics port binds (loopback unless told otherwise)
    metrics_auth: bool = False           # scrapes must send the bearer token of auth_token_file
    metrics_tls: bool = False            # serve metrics over HTTPS with tls_cert / tls_key
    max_message_bytes: int = 16 << 20    # gRPC send/receive limit
    max_workers: int = 0                 # threads running store work; 0 = sized to the machine
    host_threads: int = 0                # threads one large cached batch is split over; 0 = min(8, CPUs), 1 = never
    max_concurrent_rpcs: int = 256       # further calls get RESOURCE_EXHAUSTED with a retry hint
    retry_after_ms: int = 50             # the hint (trailing metadata retry-after-ms) of that refusal
    lease_seconds: float = 30.0          # a prefetch-lock lease lapses this long after its last use
    idempotency_keys: int = 10000        # streamed writes remembered by key, so a retry is not applied twice
    idempotency_seconds: float = 600.0   # ... for this long
    max_concurrent_streams: int = 32     # HTTP/2 streams one connection may open at once
    max_health_watches_per_peer: int = 16   # health Watch streams one address may hold (health needs no token)
    max_tables: int = 1000               # CreateTable beyond it: RESOURCE_EXHAUSTED
    max_cache_bytes: int = 0             # host cache memory of all tables together; 0 = half the machine's memory
    cache_device: str = "cpu"            # cache of a table created without cache.device: cpu | cuda | cuda:N
    max_buffered_bytes: int = 0          # request bytes all streamed writes may buffer; 0 = 1/8 of the memory
    max_buffered_bytes_per_peer: int = 0   # ... one connection's streamed writes; 0 = a quarter of the above
    max_data_bytes: int = 0              # live database size past which row-adding writes are refused;
                                         # 0 = 80% of the data directory's file system
    default_max_rows: int = 0            # eviction.max_rows of tables created without one; 0 = none
    grace_seconds: float = 10.0          # in-flight calls may finish this long on shutdown
    max_request_rows: int = 1 << 22      # rows in one Update/Delete call, all chunks together
    max_chunk_rows: int = 1 << 20        # rows in one message of a stream
    inline_lookup_bytes: int = 4 << 20   # cached lookups and Train steps up to this size run on the loop; 0: never
    same_host: bool = True               # clients on this machine may move rows through shared memory
    auth_token_file: str = ""            # file holding the bearer token; empty = no auth
    tls_cert: str = ""                   # PEM certificate chain; with tls_key turns TLS on
    tls_key: str = ""                    # PEM private key
    tls_client_ca: str = ""              # PEM CA bundle; set = mutual TLS, clients must present a cert
    event_loop: str = "auto"             # auto (uvloop when installed) | uvloop | asyncio
    log_format: str = "text"             # text | json (one JSON object per line)
    log_level: str = "info"              # debug logs every RPC; info logs failed ones
    rocksdb: RocksConfig = field(default_factory=RocksConfig)
    sweeper: SweeperConfig = field(default_factory=SweeperConfig)   # background eviction
    replica_of: str = ""                 # primary's host:port: serve as its read-only replica (docs/replication.md)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)   # change feed and following

    def __post_init__(self):
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= 65535:
                raise InvalidArgument(f"{name}: must be an integer in [0, 65535], got {value!r}")
        for name in ("max_message_bytes", "max_concurrent_rpcs", "max_concurrent_streams",
                     "max_health_watches_per_peer", "max_tables", "max_request_rows", "max_chunk_rows",
                     "retry_after_ms", "idempotency_keys"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise InvalidArgument(f"{name}: must be a positive integer, got {value!r}")
        for name, zero in (("max_cache_bytes", "half the machine's memory"),
                           ("max_buffered_bytes", "1/8 of the machine's memory"),
                           ("max_buffered_bytes_per_peer", "a quarter of max_buffered_bytes"),
                           ("max_data_bytes", "80% of the file system"), ("default_max_rows", "no limit")):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise InvalidArgument(f"{name}: must be 0 ({zero}) or a positive integer, got {value!r}")
        if not _is_int(self.inline_lookup_bytes) or self.inline_lookup_bytes < 0:
            raise InvalidArgument(f"inline_lookup_bytes: must be 0 (every lookup in the store threads) or a positive "
                                  f"integer, got {self.inline_lookup_bytes!r}")
        if not _is_int(self.host_threads) or not 0 <= self.host_threads <= MAX_HOST_THREADS:
            raise InvalidArgument(f"host_threads: must be 0 (sized to the machine) or 1 to {MAX_HOST_THREADS}, "
                                  f"got {self.host_threads!r}")
        if not _is_int(self.max_workers) or self.max_workers < 0:
            raise InvalidArgument(f"max_workers: must be 0 (sized to the machine) or a positive integer, "
                                  f"got {self.max_workers!r}")
        for name, most in (("grace_seconds", 3600), ("lease_seconds", 86400), ("idempotency_seconds", 86400)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= most:
                raise InvalidArgument(f"{name}: must be a number in [0, {most}], got {value!r}")
        if self.lease_seconds <= 0:
            raise InvalidArgument(f"lease_seconds: must be positive, got {self.lease_seconds!r}")
        for name in ("metrics_auth", "metrics_tls", "same_host"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument(f"{name}: must be true or false, got {getattr(self, name)!r}")
        if self.metrics_auth and not self.auth_token_file:
            raise InvalidArgument("metrics_auth: needs auth_token_file (scrapes present the same token)")
        if self.metrics_tls and not self.tls_cert:
            raise InvalidArgument("metrics_tls: needs tls_cert and tls_key")
        for name in ("data_dir", "host", "metrics_host"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InvalidArgument(f"{name}: must be a non-empty string")
        for name in ("auth_token_file", "tls_cert", "tls_key", "tls_client_ca", "replica_of"):
            if not isinstance(getattr(self, name), str):
                raise InvalidArgument(f"{name}: must be a file path (a string)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgument("tls_cert: tls_cert and tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise InvalidArgument("tls_client_ca: mutual TLS needs tls_cert and tls_key as well")
        if not isinstance(self.cache_device, str) or not DEVICE_PATTERN.fullmatch(self.cache_device):
            raise InvalidArgument(f"cache_device: expected 'cpu', 'cuda' or 'cuda:N', got {self.cache_device!r}")
        if self.event_loop not in EVENT_LOOPS:
            raise InvalidArgument(f"event_loop: expected one of {list(EVENT_LOOPS)}, got {self.event_loop!r}")
        if self.log_format not in LOG_FORMATS:
            raise InvalidArgument(f"log_format: expected one of {list(LOG_FORMATS)}, got {self.log_format!r}")
        if self.log_level not in LOG_LEVELS:
            raise InvalidArgument(f"log_level: expected one of {list(LOG_LEVELS)}, got {self.log_level!r}")
        for key, kind in NESTED.items():
            if not isinstance(getattr(self, key), kind):
                raise InvalidArgument(f"{key}: must be a mapping of settings")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ServerConfig:
        """Build from plain data; unknown keys are an error naming the key."""
        if not isinstance(raw, dict):
            raise InvalidArgument("config: must be a mapping")
        raw = dict(raw)
        _check_keys(cls, raw, "")
        for key, kind in NESTED.items():
            nested = raw.get(key)
            if isinstance(nested, dict):
                _check_keys(kind, nested, f"{key}.")
                raw[key] = kind(**nested)
        return cls(**raw)

    @classmethod
    def load(cls, path: str | None, overrides: dict[str, Any],
             environ: Mapping[str, str] | None = None) -> ServerConfig:
        """Defaults, then the YAML file, then `KVSTORE_*` variables of `environ`, then `overrides`
        (flags; None = not given)."""
        return resolve(path, overrides, environ or {})[0]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve(path: str | None, flags: dict[str, Any],
            environ: Mapping[str, str]) -> tuple[ServerConfig, dict[str, str]]:
    """The effective config, and where each key's value came from (default, file, the variable, the flag).
    Nested keys are dotted (`rocksdb.durability`) in both the flags and the sources."""
    path = path or environ.get(ENV_CONFIG) or None
    layers = [(_read_yaml(path) if path else {}, lambda key: f"file {path}"),
              (_from_env(environ), lambda key: ENV_PREFIX + key.replace(".", "_").upper()),
              ({k: v for k, v in flags.items() if v is not None}, lambda key: "--" + key.replace(".", "-")
               .replace("_", "-"))]
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for values, source in layers:
        for key, value in _flatten(values).items():
            raw[key] = value
            sources[key] = source(key)
    config = ServerConfig.from_dict(_nest(raw))
    return config, sources


def to_yaml(config: ServerConfig, sources: Mapping[str, str]) -> str:
    """The effective config as YAML, each key commented with where its value came from."""
    lines = []
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {inner}: {json.dumps(item)}  # {sources.get(f'{key}.{inner}', 'default')}"
                      for inner, item in value.items()]
        else:
            lines.append(f"{key}: {json.dumps(value)}  # {sources.get(key, 'default')}")
    return "\n".join(lines) + "\n"


def settable_keys() -> dict[str, type]:
    """Every scalar key (nested ones dotted) with the type of its default."""
    keys: dict[str, type] = {}
    for f in dataclasses.fields(ServerConfig):
        if f.name in NESTED:
            for inner in dataclasses.fields(NESTED[f.name]):
                keys[f"{f.name}.{inner.name}"] = type(getattr(NESTED[f.name](), inner.name))
        else:
            keys[f.name] = type(getattr(ServerConfig(), f.name))
    return keys


def parse_value(text: str, kind: type, where: str) -> Any:
    """A string from the environment or a flag, as the key's type; errors name `where`."""
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        return kind(text)
    except ValueError:
        raise InvalidArgument(f"{where}: expected {kind.__name__}, got {text!r}") from None


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    by_variable = {ENV_PREFIX + key.replace(".", "_").upper(): (key, kind) for key, kind in settable_keys().items()}
    out: dict[str, Any] = {}
    for variable, text in environ.items():
        if not variable.startswith(ENV_PREFIX) or variable == ENV_CONFIG or variable in CLIENT_VARIABLES:
            continue
        if variable not in by_variable:
            raise InvalidArgument(f"{variable}: unknown environment variable (no such config key)")
        key, kind = by_variable[variable]
        out[key] = parse_value(text, kind, variable)
    return out


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidArgument(f"config: cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidArgument(f"config: {path} must hold a mapping")
    return raw


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in NESTED and isinstance(value, dict):
            out.update({f"{key}.{inner}": item for inner, item in value.items()})
        else:
            out[key] = value
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        outer, _, inner = key.partition(".")
        if inner and outer in NESTED:
            section = out.setdefault(outer, {})
            if not isinstance(section, dict):
                raise InvalidArgument(f"{outer}: must be a mapping of settings, got {section!r}")
            section[inner] = value
        else:
            out[key] = value
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(kind: type, raw: dict[str, Any], prefix: str) -> None:
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(kind)})
    if unknown:
        raise InvalidArgument(f"{prefix}{unknown[0]}: unknown config key")
