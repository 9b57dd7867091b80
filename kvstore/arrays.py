"""Arrays callers hand a table, whatever their kind: NumPy, torch (CPU or CUDA), or CuPy.

A table works on host arrays (its tier moves rows to and from device memory
itself), so device arrays are copied to the host on the way in and results go
back as the kind of array the ids came in: torch in, torch out on the ids'
device; CuPy in, CuPy out; anything else, NumPy. bfloat16, which CuPy lacks,
is its raw 16 bits (uint16) there. No GPU library is imported unless a caller
already passed one of its arrays.
"""
from __future__ import annotations

import numpy as np

from .dtypes import WEIGHT_DTYPES

BF16 = WEIGHT_DTYPES["bfloat16"]


def _module(x) -> str:
    return type(x).__module__.partition(".")[0]


def host(x):
    """`x` as something NumPy reads without a device: torch and CuPy arrays copied to the host
    (bfloat16 tensors as ml_dtypes bfloat16); anything else unchanged."""
    kind = _module(x)
    if kind == "torch":
        import torch

        x = x.detach()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).cpu().numpy().view(BF16)
        return x.cpu().numpy()
    if kind == "cupy":
        return x.get()
    return x


def like(result: np.ndarray | None, template):
    """A host result as the kind of array `template` is (torch on its device, CuPy, or NumPy)."""
    if result is None:
        return None
    kind = _module(template)
    if kind == "torch":
        import torch

        if result.dtype == BF16:
            return torch.from_numpy(np.ascontiguousarray(result).view(np.int16)).to(template.device).view(
                torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(result)).to(template.device)
    if kind == "cupy":
        import cupy

        with template.device:
            return cupy.asarray(result.view(np.uint16) if result.dtype == BF16 else result)
    return result
