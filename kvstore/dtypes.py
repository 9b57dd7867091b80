"""Names of the element types a table or a wire tensor may hold."""
from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import InvalidArgument

WEIGHT_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype("<f8"),
}


def weight_dtype(name: str, field: str = "dtype") -> np.dtype:
    try:
        return WEIGHT_DTYPES[name]
    except KeyError:
        raise InvalidArgument(
            f"{field}: unsupported dtype {name!r}; expected one of {sorted(WEIGHT_DTYPES)}"
        ) from None
