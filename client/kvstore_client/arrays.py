"""NumPy in, NumPy out; torch tensors in, torch tensors out.

torch is optional: it is imported only when the caller passes a torch tensor
(recognised by its type's module name), never at import of the client.
"""
from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from .errors import InvalidArgumentError


def is_torch(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("torch") and (len(module) == 5 or module[5] == ".")


def to_numpy(value: Any, field: str) -> np.ndarray:
    """A NumPy view or copy of an array-like (a torch tensor goes to host memory)."""
    if not is_torch(value):
        return np.asarray(value)
    import torch

    tensor = value.detach().cpu()
    if tensor.dtype == torch.bfloat16:       # NumPy has no bfloat16: go through its bits
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if not tensor.dtype.is_floating_point and tensor.dtype not in (torch.int64, torch.int32):
        raise InvalidArgumentError(message=f"{field}: unsupported torch dtype {tensor.dtype}")
    return tensor.numpy()


def cuda_device(*values: Any):
    """The device of the first CUDA torch tensor among `values`, else None."""
    for value in values:
        if is_torch(value) and value.is_cuda:
            return value.device
    return None


def like(array: np.ndarray, template: Any) -> Any:
    """`array` as the caller's kind: a torch tensor on the template's device, or NumPy."""
    if not is_torch(template):
        return array
    import torch

    if array.dtype == ml_dtypes.bfloat16:
        tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    return tensor.to(template.device)


IDS_DTYPE = np.dtype("<i8")               # ids on the wire: int64, little-endian


def as_ids(ids: Any) -> np.ndarray:
    array = to_numpy(ids, "ids")
    if array.ndim != 1:
        raise InvalidArgumentError(message=f"ids: must be one-dimensional, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise InvalidArgumentError(message=f"ids: must be integers, got {array.dtype}")
    if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
        raise InvalidArgumentError(message="ids: values must fit in int64")
    return array.astype(IDS_DTYPE, copy=False)


def as_rows(values: Any, n: int, field: str) -> np.ndarray:
    """A [n, k] array of floats; the server checks k against the table."""
    array = to_numpy(values, field)
    if array.ndim != 2 or array.shape[0] != n:
        raise InvalidArgumentError(message=f"{field}: expected shape ({n}, dim) for {n} ids, got {array.shape}")
    return array


def chunks(n: int, row_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of about `chunk_bytes` each; one empty range when n is 0."""
    step = max(1, chunk_bytes // max(1, row_bytes))
    return [(start, min(start + step, n)) for start in range(0, n, step)] or [(0, 0)]


def _records(array: np.ndarray) -> np.ndarray | None:
    """A C-contiguous array of rows as one fixed-size record per row, or None (1-D arrays and
    non-contiguous ones): NumPy's take/put move whole records several times faster than fancy
    indexing moves rows."""
    if array.ndim < 2 or not array.flags.c_contiguous or array.size == 0:
        return None
    return array.view(f"V{array.strides[0]}").reshape(len(array))


def take_rows(array: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """array[positions] for an index array, as a new C-contiguous array."""
    records = _records(array)
    if records is None:
        return array[positions]
    return records.take(positions).view(array.dtype).reshape((len(positions),) + array.shape[1:])


def put_rows(out: np.ndarray, positions: np.ndarray, rows: np.ndarray) -> None:
    """out[positions] = rows for an index array (rows of out's dtype and row shape)."""
    records, source = _records(out), _records(np.ascontiguousarray(rows))
    if records is None or source is None or source.dtype != records.dtype:
        out[positions] = rows
        return
    records.put(positions, source)
