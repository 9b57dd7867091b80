"""Checks of the arrays a call hands a table: ids and row matrices.

Arrays must be floating point: an integer or boolean array where weights,
state or gradients belong is a client bug (int64 ids passed as weights, say),
refused with the field named, never silently converted. Floats are rounded to
the table's dtype; plain Python numbers are taken as numbers.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import InvalidArgument

_BF16 = np.dtype(ml_dtypes.bfloat16)
_F16, _F32, _F64 = np.dtype("<f2"), np.dtype("<f4"), np.dtype("<f8")
LOSSLESS = {                  # target dtype -> dtypes that widen to it exactly
    _F16: (_F16,),
    _BF16: (_BF16,),
    _F32: (_F32, _F16, _BF16),
    _F64: (_F64, _F32, _F16, _BF16),
}


def check_ids(ids) -> np.ndarray:
    """A one-dimensional int64 array of `ids`, or InvalidArgument naming the problem."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise InvalidArgument(f"ids: must be one-dimensional, got shape {ids.shape}")
    if ids.size and ids.dtype.kind not in "iu":
        raise InvalidArgument(f"ids: must be integers, got {ids.dtype}")
    if ids.dtype == np.uint64 and ids.size and ids.max() > np.iinfo(np.int64).max:
        raise InvalidArgument("ids: values must fit in int64")
    return ids.astype(np.int64, copy=False)


def check_matrix(values, n: int, width: int, dtype: np.dtype, field: str,
                 allow_nonfinite: bool = True, table: str = "") -> np.ndarray:
    """`values` as an [n, width] array of `dtype`. Arrays must be floating point; plain Python
    numbers (nested lists) are taken as the numbers they are."""
    if not hasattr(values, "dtype"):
        try:
            values = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidArgument(f"{field}: must be numbers of shape ({n}, {width})") from None
    values = np.asarray(values)
    if values.shape != (n, width):
        raise InvalidArgument(f"{field}: expected shape ({n}, {width}) for {n} ids, got {values.shape}")
    if values.dtype.kind != "f" and values.dtype not in LOSSLESS[_F64] and values.size:
        raise InvalidArgument(f"{field}: must be floating point ({np.dtype(dtype).name} for this table), "
                              f"got {values.dtype}")
    values = values.astype(dtype, copy=False)
    if not allow_nonfinite and not np.isfinite(values).all():
        raise InvalidArgument(f"{field}: contains NaN or Inf (table {table!r} does not allow them)")
    return values


def sorted_distinct(ids: np.ndarray) -> bool:
    """Whether `ids` are already sorted and distinct, as a client that de-duplicated sends them
    (the training collection does): then they need no sort, no inverse and no scatter."""
    return len(ids) < 2 or bool((ids[1:] > ids[:-1]).all())
