"""Tensors and ids on the wire: raw little-endian bytes with a dtype name and a shape.

Shared by client and server so both sides agree byte for byte. Only numpy
(and ml_dtypes, for bfloat16) is needed: the client installs without the store.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from .v1 import kvstore_pb2 as pb

WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"),
}
_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}


class WireError(ValueError):
    """A tensor or id field is malformed; the message names the field."""


def encode_ids(ids: np.ndarray) -> bytes:
    return np.ascontiguousarray(ids, dtype="<i8").tobytes()


def decode_ids(blob: bytes, field: str = "ids") -> np.ndarray:
    if len(blob) % 8:
        raise WireError(f"{field}: {len(blob)} bytes is not a multiple of 8 (packed int64)")
    return np.frombuffer(blob, dtype="<i8")


def encode_tensor(array: np.ndarray) -> pb.Tensor:
    array = np.asarray(array)
    name = _NAMES.get(array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype)
    if name is None:
        raise WireError(f"tensor: unsupported dtype {array.dtype}; expected one of {sorted(WIRE_DTYPES)}")
    array = np.ascontiguousarray(array, dtype=WIRE_DTYPES[name])
    return pb.Tensor(dtype=name, shape=list(array.shape), data=array.tobytes())


def decode_tensor(tensor: pb.Tensor, field: str) -> np.ndarray:
    """Zero-copy (read-only) view of a wire tensor; errors name `field`."""
    dtype = WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise WireError(f"{field}.dtype: unsupported dtype {tensor.dtype!r}; expected one of {sorted(WIRE_DTYPES)}")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"{field}.shape: negative dimension in {shape}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise WireError(
            f"{field}.data: {len(tensor.data)} bytes do not match shape {shape} of {tensor.dtype} ({expected} bytes)"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
