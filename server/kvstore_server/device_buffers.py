"""Clients' GPU buffers, as the same-host path sees them: opened by CUDA IPC, checked, closed safely.

A client on this machine whose rows live on a GPU allocates a buffer there
(cuMemAlloc), exports it (cuIpcGetMemHandle) and names regions of it in its
SharedLookup (where the rows go), SharedUpdate (weights) and SharedApplyGradients
(gradients) calls. A GPU table's cached rows are then gathered straight into the
client's memory; other rows are copied there from the host. Inputs are copied to
the host before anything is checked, as the segments' are.

Opening a handle costs tens of milliseconds, so a buffer is opened once
(AttachDeviceBuffer) and kept (at most `MAX_OPEN`, least recently used closed
first). A buffer in use by a call is closed only when that call ends: a mapping
closed under a running kernel would fault the server's whole CUDA context. Before
keeping a buffer the server checks, through the driver, that the allocation spans
every byte the client claims, and that it starts with the client's token.
Every region a call names is checked against that size (segments.region).
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from kvstore.errors import InvalidArgument

from .segments import TOKEN_BYTES, check_name, checked_span

MAX_OPEN = 64                   # idle buffers kept open at once (a call's own is never closed under it)
HANDLE_BYTES = 64               # sizeof(CUipcMemHandle)
UUID_BYTES = 16


def device_region(buffer: DeviceBuffer, spec, field: str, shape: tuple[int | None, ...], dtype: str | None = None,
                  exact: bool = False):
    """A CuPy view of the array `spec` names in `buffer`, checked as `segments.region` checks a segment's
    (bfloat16 appears as its uint16 bits, as in the GPU tier)."""
    sent, wire, offset = checked_span(spec, field, shape, dtype, exact, buffer.size, "the GPU buffer")
    return buffer.view(sent, "uint16" if wire.name == "bfloat16" else wire, offset)


def upload(out, rows) -> None:
    """Host `rows` into `out`, a region of a client's GPU buffer, finished before this returns
    (the call's answer may follow at once)."""
    with out.device:
        out.set(np.ascontiguousarray(rows).view(out.dtype))
        _finish_stream()


def _finish_stream() -> None:
    import cupy

    cupy.cuda.get_current_stream().synchronize()


class Unopenable(Exception):
    """A buffer this server cannot open; the message says why (the client uses its segment instead)."""


@dataclass
class DeviceBuffer:
    """One opened buffer: where it is mapped in this process, on which device, and who is using it."""

    name: str
    device: int
    pointer: int
    size: int
    users: int = 0
    closing: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def view(self, shape: tuple[int, ...], dtype, offset: int):
        """A CuPy array over `shape` of `dtype` from `offset` (checked by the caller)."""
        import cupy

        nbytes = max(1, math.prod(shape) * np.dtype(dtype).itemsize)
        memory = cupy.cuda.UnownedMemory(self.pointer + offset, nbytes, self, self.device)
        return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))

    def close(self) -> None:
        import cupy

        with cupy.cuda.Device(self.device):
            cupy.cuda.runtime.ipcCloseMemHandle(self.pointer)
        self.closed.set()


def cuda_unavailable() -> str:
    """Why this server cannot open GPU buffers ("" when it can)."""
    try:
        import cupy
    except ImportError:
        return "the server has no CuPy (install the gpu extra)"
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "the server sees no CUDA device"
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        return f"the server cannot use CUDA ({exc})"
    return ""


def _device_of(uuid: bytes) -> int | None:
    import cupy

    for device in range(cupy.cuda.runtime.getDeviceCount()):
        if device_uuid(device) == uuid:
            return device
    return None


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def device_uuid(device: int) -> bytes:
    """The 16-byte UUID of CUDA device `device` (as the process numbers them), from the driver.
    Not CuPy's device properties: they end the UUID at its first zero byte, so a GPU whose UUID
    has one never matched its clients' (found on an H200 host). b"" when the driver says no."""
    driver = _driver()
    get_uuid = getattr(driver, "cuDeviceGetUuid_v2", None) or driver.cuDeviceGetUuid
    handle, uuid = ctypes.c_int(), (ctypes.c_char * 16)()
    if driver.cuInit(0) or driver.cuDeviceGet(ctypes.byref(handle), device) or get_uuid(uuid, handle):
        return b""
    return uuid.raw


def _allocation_span(pointer: int) -> tuple[int, int]:
    """(base, size) of the allocation holding `pointer`, from the driver (the current device's context)."""
    driver = _driver()
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    status = driver.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(pointer))
    if status != 0:
        raise Unopenable(f"the driver cannot size the opened buffer (CUresult {status})")
    return base.value, size.value


def _open(name: str, handle: bytes, size: int, uuid: bytes, token: bytes) -> DeviceBuffer:
    import cupy

    device = _device_of(uuid)
    if device is None:
        raise Unopenable("the client's GPU is not one this server sees (CUDA_VISIBLE_DEVICES, another container?)")
    with cupy.cuda.Device(device):
        try:
            pointer = cupy.cuda.runtime.ipcOpenMemHandle(handle)
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise Unopenable(f"cannot open the client's GPU buffer ({exc})") from None
        buffer = DeviceBuffer(name, device, pointer, size)
        try:
            base, span = _allocation_span(pointer)
            if base != pointer or span < size:
                raise Unopenable(f"the client's GPU allocation spans {span} bytes from its start, not the {size} "
                                 "it claims")
            seen = cupy.asnumpy(buffer.view((TOKEN_BYTES,), "uint8", 0)).tobytes()
            if seen != token:
                raise Unopenable("the client's GPU buffer does not hold its token")
        except BaseException:
            buffer.close()
            raise
    return buffer


class DeviceBuffers:
    """The GPU buffers this server has opened, by name; only the event loop uses it (no lock)."""

    def __init__(self, max_open: int = MAX_OPEN):
        self.max_open = max_open
        self._open: OrderedDict[str, DeviceBuffer] = OrderedDict()
        self._unavailable: str | None = None

    def __len__(self) -> int:
        return len(self._open)

    async def attach(self, name: str, handle: bytes, size: int, uuid: bytes, token: bytes) -> str:
        """Open `name` and check it (the driver's work in a thread); "" when usable, else why not."""
        check_name(name, "buffer")
        for what, value, want in (("handle", handle, HANDLE_BYTES), ("device_uuid", uuid, UUID_BYTES),
                                  ("token", token, TOKEN_BYTES)):
            if len(value) != want:
                raise InvalidArgument(f"{what}: expected {want} bytes, got {len(value)}")
        if size < TOKEN_BYTES:
            raise InvalidArgument(f"size: {size} bytes cannot hold the {TOKEN_BYTES}-byte token")
        if self._unavailable is None:
            self._unavailable = await asyncio.to_thread(cuda_unavailable)
        if self._unavailable:
            return self._unavailable
        if name in self._open:
            return ""
        try:
            buffer = await asyncio.to_thread(_open, name, handle, size, uuid, token)
        except Unopenable as exc:
            return str(exc)
        if name in self._open:                  # attached twice at once: keep the first
            buffer.close()
            return ""
        self._open[name] = buffer
        self._close_extra()
        return ""

    @contextmanager
    def using(self, name: str, field: str):
        """The open buffer `name` for the length of one call (else InvalidArgument naming `field`)."""
        buffer = self._open.get(name)
        if buffer is None or buffer.closing:
            raise InvalidArgument(f"{field}.device_buffer: no GPU buffer {name[:48]!r} is attached to this server; "
                                  "call AttachDeviceBuffer first")
        self._open.move_to_end(name)
        buffer.users += 1
        try:
            yield buffer
        finally:
            buffer.users -= 1
            if buffer.closing and not buffer.users:
                buffer.close()

    async def detach(self, name: str) -> None:
        """Close `name`, once the calls using it have ended: when this returns the client may free it."""
        buffer = self._open.pop(name, None)
        if buffer is not None:
            self._retire(buffer)
            await buffer.closed.wait()

    def close(self) -> None:
        while self._open:
            self._retire(self._open.popitem()[1])

    def _close_extra(self) -> None:
        """Past `max_open`, close the least recently used idle buffers (a client's next call through
        one is refused, and the client attaches a new one)."""
        idle = [name for name, buffer in self._open.items() if not buffer.users]
        for name in idle[:max(0, len(self._open) - self.max_open)]:
            self._retire(self._open.pop(name))

    @staticmethod
    def _retire(buffer: DeviceBuffer) -> None:
        buffer.closing = True
        if not buffer.users:
            buffer.close()
