"""What the GPU tier's CUDA modules are compiled from, without CuPy: the sources, the options
and the template instantiations each module names. `gpu_kernels` compiles them with CuPy on a
GPU host; a test compiles the same with NVRTC alone where there is no GPU (CI), so a kernel that
does not compile, or a launcher naming a template or kernel the sources lack, fails there too."""
from __future__ import annotations

from kvstore_native import SOURCE_DIR

SOURCES = ("cache_kernels.cu", "optimizer_kernels.cu")   # one compilation unit, in this order
OPTIONS = ("-std=c++17",)
OPTIMIZER_CODES = {"sgd": 0, "adagrad": 1, "rowwise_adagrad": 2, "adam": 3, "partial_rowwise_adam": 4}
WEIGHT_TYPES = {"float32": "float", "float64": "double", "float16": "half_t", "bfloat16": "bf16_t"}
COPY_TYPES = {16: "uint4", 8: "unsigned long long", 4: "unsigned int", 2: "unsigned short", 1: "unsigned char"}
PROBE_TYPES = {"generic": "probe<32, 1>", "ways32": "probe<8, 4>"}
COPY_ROWS_IN_FLIGHT = 2              # rows a thread group copies at once (4 also compiled, for comparison)
STEP_ROWS_IN_FLIGHT = 1              # rows a warp steps at once (2 needs more registers: fewer warps, slower)


def source() -> str:
    return "\n".join((SOURCE_DIR / name).read_text() for name in SOURCES)


def cache_names() -> list[str]:
    """The templates of the cache's module (its extern "C" kernels need no names)."""
    names = list(PROBE_TYPES.values())
    names += [f"copy_rows<{t}, {COPY_ROWS_IN_FLIGHT}>" for t in COPY_TYPES.values()]
    names += [f"copy_rows<{COPY_TYPES[16]}, 4>"]
    return names


def step_name(weight: str, code: int, vec: bool, seg: bool) -> str:
    return f"optimizer_step<{weight}, {code}, {int(vec)}, {STEP_ROWS_IN_FLIGHT}, {int(seg)}>"


def step_names(weight: str, code: int) -> list[str]:
    """The fused steps of one weight type and optimizer: with and without vector moves and
    duplicate segments (one module per pair, compiled when a table first needs it)."""
    return [step_name(weight, code, vec, seg) for vec in (0, 1) for seg in (0, 1)]
