"""GPU tests: they run where CuPy sees a CUDA device and skip cleanly everywhere else."""
from __future__ import annotations

import importlib.util

import pytest


def gpu_usable() -> bool:
    """Whether CuPy is installed and sees a CUDA device (tests of the GPU-absent path skip when it does)."""
    if importlib.util.find_spec("cupy") is None:
        return False
    import cupy

    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver: CuPy's runtime error
        return False


def require_gpu():
    """CuPy, after checking a device is there; skips the calling module otherwise."""
    if not gpu_usable():
        pytest.skip("no CUDA device (or CuPy not installed)", allow_module_level=True)
    import cupy

    return cupy
