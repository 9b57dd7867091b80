"""GPU tests: they run where CuPy sees a CUDA device and skip cleanly everywhere else."""
from __future__ import annotations

import pytest


def require_gpu():
    """CuPy, after checking a device is there; skips the calling module otherwise."""
    cupy = pytest.importorskip("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver, no device: CuPy raises its runtime error
        count = 0
    if count < 1:
        pytest.skip("no CUDA device", allow_module_level=True)
    return cupy
