"""The GPU tier's CUDA sources compile, and name every kernel its launchers call, where there is no
GPU: NVRTC (the compiler CuPy uses at run time, from NVIDIA's `nvidia-cuda-nvrtc-cu12` wheel in the
test extra) needs no device, so CI catches a broken kernel before a GPU host does."""
from __future__ import annotations

import ctypes
import importlib.util
import re
from pathlib import Path

import pytest

from kvstore import gpu_sources

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = (ROOT / "kvstore" / "gpu_kernels.py", ROOT / "kvstore" / "gpu_cache.py")
ARCHS = ["compute_80", "compute_90"]      # Ampere (A100) and Hopper (H100, H200: what the tier is tuned for)


def nvrtc() -> ctypes.CDLL:
    """libnvrtc from the NVIDIA wheel (or a CUDA toolkit on the loader's path); skips without one."""
    spec = importlib.util.find_spec("nvidia")
    candidates = [Path(p) / "cuda_nvrtc" / "lib" / "libnvrtc.so.12" for p in (spec.submodule_search_locations
                                                                          if spec else [])]
    for path in [str(c) for c in candidates if c.exists()] + ["libnvrtc.so.12", "libnvrtc.so"]:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    pytest.skip("NVRTC not installed (pip install nvidia-cuda-nvrtc-cu12)")


def compile_with_nvrtc(source: str, names: list[str], arch: str = ARCHS[-1]) -> tuple[int, str, dict[str, str]]:
    """(result code, log, lowered name of each name expression) of one NVRTC compilation."""
    lib = nvrtc()
    program = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kvstore.cu", 0, None, None) == 0
    try:
        for name in names:
            assert lib.nvrtcAddNameExpression(program, name.encode()) == 0
        options = [o.encode() for o in gpu_sources.OPTIONS] + [f"--gpu-architecture={arch}".encode()]
        result = lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(program, log)
        lowered = {}
        for name in names if result == 0 else []:
            out = ctypes.c_char_p()
            if lib.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(out)) == 0 and out.value:
                lowered[name] = out.value.decode()
        return result, log.value.decode(errors="replace"), lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def every_template() -> list[str]:
    """The cache module's templates and every (weight type, optimizer) pair's fused steps."""
    names = gpu_sources.cache_names()
    for weight in gpu_sources.WEIGHT_TYPES.values():
        for code in gpu_sources.OPTIMIZER_CODES.values():
            names += gpu_sources.step_names(weight, code)
    return names


@pytest.mark.parametrize("arch", ARCHS)
def test_the_sources_compile_with_every_template_the_launchers_name(arch):
    names = every_template()
    assert len(names) == 8 + 4 * 5 * 4
    result, log, lowered = compile_with_nvrtc(gpu_sources.source(), names, arch)
    errors = [line for line in log.splitlines() if "error" in line]
    assert result == 0, "\n".join(errors[:20]) or log[-3000:]
    assert sorted(lowered) == sorted(names)          # each template exists with the arguments given


def test_a_kernel_that_does_not_compile_fails_here():
    """The check above can fail: the same sources with one kernel broken do not compile."""
    broken = gpu_sources.source().replace("atomicAdd(count, mine);", "atomicAdd(count, undefined_here);")
    assert broken != gpu_sources.source()
    result, log, _ = compile_with_nvrtc(broken, [])
    assert result != 0 and "undefined_here" in log


def test_every_kernel_a_launcher_calls_by_name_is_in_the_sources():
    """Launchers look kernels up by name at run time (`_fn`, `_each`): a name the
    sources lack would fail only on a GPU, on first use."""
    called = set()
    for path in LAUNCHERS:
        text = path.read_text()
        called |= set(re.findall(r'(?:_fn|_each)\(\s*"(\w+)"', text))
    defined = set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(',
                             gpu_sources.source()))
    assert len(called) >= 15, called
    assert called <= defined, sorted(called - defined)


def test_the_benchmarks_ceiling_kernels_compile():
    """native/bench_kernels.cu (compiled by bench/gpu_cache.py alone) compiles, with the kernel it calls."""
    source = (ROOT / "native" / "bench_kernels.cu").read_text()
    result, log, _ = compile_with_nvrtc(source, [])
    assert result == 0, log[-3000:]
    assert 'extern "C" __global__ void step_traffic(' in source
    assert 'get_function("step_traffic")' in (ROOT / "bench" / "gpu_cache.py").read_text()
