"""Conversions between wire messages and the store's types.

Proto3 scalars cannot say "unset", so a field at its zero value means "use the
default" (dtype "" -> float32, cache.rows 0 -> default, no optimizer -> sgd);
`dim` is the exception: 0 is sent on to validation and rejected.
"""
from __future__ import annotations

import numpy as np
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
_NESTED = ("optimizer", "initializer", "cache")


def table_config_from_proto(message: pb.TableConfig) -> TableConfig:
    raw = {f.name: value for f, value in message.ListFields() if f.name not in _NESTED}
    raw.setdefault("name", "")
    raw["dim"] = message.dim
    for key in _NESTED:
        if message.HasField(key):
            raw[key] = {f.name: value for f, value in getattr(message, key).ListFields()}
    return TableConfig.from_dict(raw)


def table_config_to_proto(config: TableConfig) -> pb.TableConfig:
    raw = config.to_dict()
    return pb.TableConfig(
        name=raw["name"],
        dim=raw["dim"],
        dtype=raw["dtype"],
        optimizer=pb.OptimizerConfig(**raw["optimizer"]),
        initializer=pb.InitializerConfig(**raw["initializer"]),
        cache=pb.CacheConfig(**raw["cache"]),
        allow_nonfinite=raw["allow_nonfinite"],
    )


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
