"""Arrays in and out of the GPU table, without copies where the caller is on the GPU.

Torch CUDA tensors and CuPy arrays cross by DLPack (zero copy); NumPy arrays
and CPU tensors are copied to the device. Results go back as the kind of array
the ids came in: torch in, torch out (by DLPack, no copy); CuPy in, CuPy out;
NumPy in, NumPy out. bfloat16, which CuPy lacks, lives on the device as its raw
16 bits (uint16) and is viewed back as bfloat16 for torch and NumPy callers.
"""
from __future__ import annotations

import cupy
import numpy as np

from .dtypes import WEIGHT_DTYPES

BF16 = WEIGHT_DTYPES["bfloat16"]


def device_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype an array of `dtype` has on the device (bfloat16 -> uint16 bits)."""
    return np.dtype(np.uint16) if dtype == BF16 else np.dtype(dtype)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def kind_of(x) -> str:
    if isinstance(x, cupy.ndarray):
        return "cupy"
    if _is_torch(x):
        return "torch"
    return "numpy"


def to_device(x, device: cupy.cuda.Device) -> tuple[cupy.ndarray | np.ndarray, bool]:
    """(array, on_device): CuPy arrays and torch CUDA tensors as CuPy arrays on `device`
    (zero copy when already there); anything else as a NumPy array for host validation."""
    if _is_torch(x):
        import torch

        x = x.detach()
        if not x.is_cuda:
            return _numpy_of_torch(x), False
        bf16 = x.dtype == torch.bfloat16
        arr = cupy.from_dlpack(x.view(torch.int16) if bf16 else x)
        if bf16:
            arr = arr.view(cupy.uint16)
        x = arr
    if isinstance(x, cupy.ndarray):
        if x.device.id != device.id:
            with device:
                x = cupy.array(x)
        return x, True
    return np.asarray(x), False


def _numpy_of_torch(x) -> np.ndarray:
    import torch

    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(BF16)
    return x.numpy()


def from_device(x: cupy.ndarray, kind: str, dtype: np.dtype):
    """A device array of logical dtype `dtype`, as the caller's kind of array."""
    bf16 = np.dtype(dtype) == BF16
    if kind == "cupy":
        return x
    if kind == "torch":
        import torch

        if bf16:
            return torch.from_dlpack(x.view(cupy.int16)).view(torch.bfloat16)
        return torch.from_dlpack(x)
    host = cupy.asnumpy(x)
    return host.view(BF16) if bf16 else host


def host_view(x: np.ndarray) -> np.ndarray:
    """A host array in its device dtype (bfloat16 -> uint16 bits)."""
    return x.view(np.uint16) if x.dtype == BF16 else x


class PinnedBuffer:
    """A grow-only page-locked host buffer: rows cross PCIe at full speed through it."""

    def __init__(self):
        self._buffer = np.empty(0, dtype=np.uint8)

    def view(self, shape: tuple[int, ...], dtype=np.uint8) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if self._buffer.nbytes < nbytes:
            import cupyx

            self._buffer = cupyx.empty_pinned(max(nbytes, 2 * self._buffer.nbytes), dtype=np.uint8)
        return self._buffer[:nbytes].view(dtype).reshape(shape)

    def upload(self, host: np.ndarray) -> cupy.ndarray:
        """A device copy of `host`, staged through the pinned buffer."""
        host = host_view(np.ascontiguousarray(host))
        staged = self.view(host.shape, host.dtype)
        np.copyto(staged, host)
        out = cupy.empty(host.shape, dtype=host.dtype)
        out.set(staged)
        return out

    def download(self, device_array: cupy.ndarray) -> np.ndarray:
        """A host copy of a device array (the returned array is a fresh copy, not the buffer)."""
        if device_array.size == 0:
            return np.empty(device_array.shape, dtype=device_array.dtype)
        staged = self.view(device_array.shape, device_array.dtype)
        device_array.get(out=staged)
        return staged.copy()
