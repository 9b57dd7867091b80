"""Conversions between wire messages and the store's types.

Proto3 scalars cannot say "unset", so a field at its zero value means "use the
default" (dtype "" -> float32, cache.rows 0 -> default, no optimizer -> sgd,
cache.device "" -> the server's `cache_device`); `dim` is the exception: 0 is
sent on to validation and rejected. Going out, a cache without a host tier
sends host_policy empty, so only a table that has one shows its policy.
"""
from __future__ import annotations

import numpy as np
from google.protobuf.message_factory import GetMessageClass
from kvstore_proto.v1 import kvstore_pb2 as pb

from kvstore import TableConfig
from kvstore.errors import InvalidArgument

ON_MISS = {
    pb.ON_MISS_UNSPECIFIED: "init_insert",
    pb.ON_MISS_INIT_INSERT: "init_insert",
    pb.ON_MISS_INIT: "init",
    pb.ON_MISS_ZEROS: "zeros",
    pb.ON_MISS_ERROR: "error",
}
_NESTED = ("optimizer", "initializer", "cache", "eviction")


def table_config_from_proto(message: pb.TableConfig, cache_device: str = "cpu") -> TableConfig:
    """The store's config of a wire config; a cache without a device gets `cache_device`."""
    raw = {f.name: value for f, value in message.ListFields() if f.name not in _NESTED}
    raw.setdefault("name", "")
    raw["dim"] = message.dim
    for key in _NESTED:
        if message.HasField(key):
            raw[key] = {f.name: value for f, value in getattr(message, key).ListFields()}
    raw.setdefault("cache", {}).setdefault("device", cache_device)
    return TableConfig.from_dict(raw)


def table_config_to_proto(config: TableConfig) -> pb.TableConfig:
    """The wire form of a config, the cache's device and host tier included."""
    raw = config.to_dict()
    if not config.cache.host_rows:
        raw["cache"]["host_policy"] = ""          # no host tier: no policy of one to show
    return _to_message(pb.TableConfig, raw)


def _to_message(kind: type, raw: dict):
    fields = kind.DESCRIPTOR.fields_by_name
    values = {}
    for key, value in raw.items():
        field = fields.get(key)
        if field is None or value is None:
            continue
        values[key] = _to_message(GetMessageClass(field.message_type), value) if field.message_type else value
    return kind(**values)


def on_miss_name(value: int) -> str:
    try:
        return ON_MISS[value]
    except KeyError:
        raise InvalidArgument(
            f"on_miss: unknown value {value}; expected one of {sorted(ON_MISS)}"
        ) from None


def concat(parts: list[np.ndarray]) -> np.ndarray:
    """One array from the buffered chunks of a stream (at least one)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
