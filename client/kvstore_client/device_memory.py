"""This client's GPU buffers for the same-host path: rows and gradients through CUDA IPC.

When a trainer's tensors live on a GPU and its server, on the same machine, keeps
the table in GPU memory, rows need not go through the host at all. The client
allocates a buffer on its GPU with the driver (`cuMemAlloc`: the memory is the
client's own, outside torch's caching allocator, so its IPC handle covers exactly
this buffer), exports it with `cuIpcGetMemHandle`, and wraps it as a torch tensor
(`__cuda_array_interface__`, no copy). The server opens the handle once
(AttachDeviceBuffer) and, per call, gathers cached rows straight into it or reads
gradients from it. Buffers are lent one call at a time by a `SegmentPool`, like the
shared-memory segments, and a buffer whose call was not answered is retired.

Only the CUDA driver library (`libcuda.so.1`, present wherever CUDA runs) and torch
are used; without either nothing here is imported.
"""
from __future__ import annotations

import ctypes
import math
import secrets

from kvstore_proto.tensors import WIRE_DTYPES
from kvstore_proto.v1 import kvstore_pb2 as pb

from .shared_memory import ALIGN, PREFIX

HANDLE_BYTES = 64                     # sizeof(CUipcMemHandle)
MIN_BUFFER_BYTES = 1 << 20


class DeviceMemoryError(Exception):
    """The driver refused (no libcuda, out of memory, ...); the message says what."""


_driver = None
_ABANDONED: list[DeviceBuffer] = []       # buffers the server may still use: never freed


def _cuda():
    global _driver
    if _driver is None:
        try:
            _driver = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise DeviceMemoryError(f"no CUDA driver library ({exc})") from None
    return _driver


def _check(status: int, what: str) -> None:
    if status != 0:
        raise DeviceMemoryError(f"{what} failed (CUresult {status})")


class _Context:
    """The primary context of a device, current for the length of a `with` (torch uses the same one)."""

    def __init__(self, index: int):
        driver = _cuda()
        device = ctypes.c_int()
        _check(driver.cuDeviceGet(ctypes.byref(device), index), "cuDeviceGet")
        self.context = ctypes.c_void_p()
        _check(driver.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), device), "cuDevicePrimaryCtxRetain")
        self.device = device

    def __enter__(self):
        _check(_cuda().cuCtxPushCurrent_v2(self.context), "cuCtxPushCurrent")
        return self

    def __exit__(self, *exc) -> None:
        _cuda().cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))

    def release(self) -> None:
        _cuda().cuDevicePrimaryCtxRelease_v2(self.device)


class _Interface:
    """What torch.as_tensor needs to wrap a raw device pointer (no copy)."""

    def __init__(self, pointer: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (pointer, False),
                                         "version": 3}


class DeviceBuffer:
    """One GPU buffer of this client's, filled front to back by the call that holds it."""

    def __init__(self, nbytes: int, device):
        import torch

        self.device = torch.device(device)
        self.name = PREFIX + secrets.token_hex(16)
        self.size = nbytes
        self.used = 0
        self._context = _Context(self.device.index)
        pointer = ctypes.c_uint64()
        with self._context:
            _check(_cuda().cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(nbytes)), "cuMemAlloc")
            self.pointer = pointer.value
            handle = (ctypes.c_char * HANDLE_BYTES)()
            try:
                _check(_cuda().cuIpcGetMemHandle(handle, pointer), "cuIpcGetMemHandle")
            except DeviceMemoryError:
                _cuda().cuMemFree_v2(pointer)
                raise
        self.handle = bytes(handle)
        self.uuid = bytes.fromhex(str(torch.cuda.get_device_properties(self.device).uuid).replace("-", ""))
        self.bytes = torch.as_tensor(_Interface(self.pointer, nbytes), device=self.device)

    def write_token(self, token: bytes) -> None:
        import torch

        self.bytes[:len(token)].copy_(torch.frombuffer(bytearray(token), dtype=torch.uint8))
        torch.cuda.synchronize(self.device)

    def array(self, shape: tuple[int, ...], dtype: str):
        """A fresh region: a tensor view of `shape` and `dtype` and its description for the server."""
        import torch

        offset = -(-self.used // ALIGN) * ALIGN
        itemsize = WIRE_DTYPES[dtype].itemsize
        nbytes = math.prod(shape) * itemsize
        if offset + nbytes > self.size:
            raise ValueError(f"GPU buffer {self.name}: {nbytes} bytes at {offset} exceed its {self.size}")
        self.used = offset + nbytes
        view = self.bytes[offset:offset + nbytes].view(getattr(torch, dtype)).view(shape)
        return view, pb.SharedArray(dtype=dtype, shape=shape, offset=offset, device_buffer=self.name)

    def abandon(self) -> None:
        """Retired without the server's word that it closed its handle (the detach failed): the
        server may still write here, so the memory is kept until this process ends."""
        _ABANDONED.append(self)

    def close(self) -> None:
        """Free the memory (the server has closed its handle: DetachSegment was answered, or it never opened it)."""
        if self.pointer:
            import torch

            torch.cuda.synchronize(self.device)         # no copy of ours still reads or writes it
            self.bytes = None
            with self._context:
                _cuda().cuMemFree_v2(ctypes.c_uint64(self.pointer))
            self._context.release()
            self.pointer = 0

