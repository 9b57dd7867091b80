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


@pytest.fixture
def compiles(monkeypatch) -> list[str]:
    """Every kernel CuPy compiles from here on, as 'name from [the last kvstore frames]': a kernel
    compiled on a request's path stalls a fresh server for as long as NVRTC takes (seconds)."""
    import re
    import traceback

    import cupy

    seen: list[str] = []
    compile_module = cupy.cuda.compiler._compile_module_with_cache

    def counted(*args, **kwargs):
        kernel = re.findall(r"void (\w+)\(", args[0])
        where = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in traceback.extract_stack()
                 if "/kvstore/" in f.filename]
        seen.append(f"{kernel[:1]} from {where[-3:]}")
        return compile_module(*args, **kwargs)

    monkeypatch.setattr(cupy.cuda.compiler, "_compile_module_with_cache", counted)
    return seen
