"""CUDA IPC calls of the same-host path: a GPU table's rows and a trainer's CUDA tensors, GPU to GPU.

A mixin of `SameHostPath` (same_host.py): when the table's cache is in the server's
GPU memory and the caller's tensors are on a GPU, rows are written by the server
into a GPU buffer of this client's (device_memory.py) and gradients or weights are
read by the server from one; ids still go through the segment. Everything here
needs torch with CUDA, imported where used; without it the pool is None and the
segment path serves (docs/same-host.md).
"""
from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import numpy as np
from kvstore_proto.tensors import WIRE_DTYPES
from kvstore_proto.v1 import kvstore_pb2 as pb

from .arrays import cuda_device
from .errors import InvalidArgumentError, KVStoreError
from .errors import rpc_errors as _rpc
from .shared_memory import NotAttached, SegmentPool, region_bytes

DEVICE_CALL_BYTES = 64 << 20          # rows per SharedLookup into a GPU buffer (bounds the buffer)


class CudaIpcCalls:
    """GPU buffers per device, and the lookups, updates and gradient pushes that use them."""

    def init_cuda_ipc(self) -> None:
        self.cuda_ipc = True                 # GPU tables: rows and gradients of CUDA tensors through GPU buffers
        self.device_reason = ""              # why not, once a device was refused
        self._device_pools: dict[str, SegmentPool | None] = {}
        self._device_lock = threading.Lock()

    def _gpu_parts(self, gradients: dict, lookups: dict, device) -> tuple[set[str], set[str]]:
        """The tables of a step whose gradients, and whose looked-up rows, go through a GPU buffer on
        `device` (GPU tables, CUDA float32 gradients on that device)."""
        if device is None or device.type != "cuda" or self.device_pool(device) is None:
            return set(), set()
        import torch

        grads = {table for table, (_, g) in gradients.items()
                 if cuda_device(g) == device and g.dtype == torch.float32 and self.gpu_table(table)}
        return grads, {table for table in lookups if self.gpu_table(table)}

    def give_buffer(self, buffer) -> None:
        """A step's GPU buffer, answered and copied out, back to its pool."""
        self.device_pool(buffer.device).give(buffer)

    def retire_buffer(self, buffer) -> None:
        self.device_pool(buffer.device).retire(buffer)

    def device_pool(self, device) -> SegmentPool | None:
        """The GPU buffers on `device` (a CUDA torch.device) that the server opens, or None when it
        cannot (no CuPy there, a GPU it does not see, `cuda_ipc` off...: `device_reason` says why);
        asked once per device."""
        key = str(device)
        with self._device_lock:
            if key not in self._device_pools:
                self._device_pools[key] = self._new_device_pool(device)
            return self._device_pools[key]

    def _new_device_pool(self, device) -> SegmentPool | None:
        if not self.cuda_ipc or not self.usable():
            return None
        from .device_memory import DeviceBuffer, DeviceMemoryError

        pool = SegmentPool(self._attach_buffer, self._detach, lambda nbytes: DeviceBuffer(nbytes, device))
        try:
            pool.check()
            return pool
        except (NotAttached, DeviceMemoryError) as exc:
            self.device_reason = f"{device}: {exc}"
        except KVStoreError as exc:
            if exc.code.name != "UNIMPLEMENTED":
                raise
            self.device_reason = "the server has no CUDA IPC path (an older version)"
        pool.close()
        return None

    def gpu_table(self, table: str) -> bool:
        """Whether `table`'s cache is in the server's GPU memory (the case CUDA IPC is for)."""
        self._table(table)
        return self._gpu_tables[table]

    def lookup_to_device(self, table: str, id_array: np.ndarray, device, out, on_miss: int, lease: str):
        """Rows of `id_array` as a tensor on `device` (into `out` when given), written there by the
        server through a GPU buffer; None when that path cannot be had (the caller takes another)."""
        import torch

        if not self.gpu_table(table) or (pool := self.device_pool(device)) is None:
            return None
        dim, dtype = self._table(table)
        n = len(id_array)
        if out is None:
            out = torch.empty((n, dim), dtype=getattr(torch, dtype), device=device)
        elif tuple(out.shape) != (n, dim) or out.dtype != getattr(torch, dtype):
            raise InvalidArgumentError(message=f"out: expected shape ({n}, {dim}) of torch.{dtype}, "
                                               f"got {tuple(out.shape)} of {out.dtype}")
        step = max(1, DEVICE_CALL_BYTES // max(1, dim * WIRE_DTYPES[dtype].itemsize))
        for start in range(0, n, step):
            ids = id_array[start:start + step]
            self._through_buffer(pool, lambda buffer, ids=ids, start=start: self._device_lookup(
                buffer, table, ids, out[start:start + len(ids)], on_miss, lease, dim, dtype),
                region_bytes(((len(ids), dim), WIRE_DTYPES[dtype].itemsize)))
        return out

    def _device_lookup(self, buffer, table, ids, out, on_miss, lease, dim, dtype) -> None:
        import torch

        n = len(ids)
        with self.pool.lease(region_bytes(((n,), 8))) as segment:
            rows, spec = buffer.array((n, dim), dtype)
            request = pb.SharedLookupRequest(table=table, segment=segment.name, on_miss=on_miss, lease=lease,
                                             ids=segment.put(ids, "ids"), weights=spec)
            self._shared_lookup(lambda: request)            # on the doorbell when the server has one
        with torch.cuda.device(out.device):
            out.copy_(rows)
            torch.cuda.current_stream().synchronize()      # the buffer is lent again once this returns

    def push_device_gradients(self, table: str, id_array: np.ndarray, grads, owner: str,
                              score_array: np.ndarray | None) -> int | None:
        """apply_gradients of a CUDA float32 [n, dim] tensor read by the server from a GPU buffer (ids
        and scores through the segment); None when that path cannot be had."""
        return self._device_write("SharedApplyGradients", pb.SharedApplyGradientsRequest, table, id_array,
                                  "grads", grads, {"scores": score_array}, owner=owner)

    def update_from_device(self, table: str, id_array: np.ndarray, weights, state_array: np.ndarray | None,
                           score_array: np.ndarray | None) -> int | None:
        """update with the weights of a CUDA tensor read by the server from a GPU buffer."""
        return self._device_write("SharedUpdate", pb.SharedUpdateRequest, table, id_array, "weights", weights,
                                  {"state": state_array, "scores": score_array})

    def _device_write(self, method, kind, table, id_array, field, tensor, host_arrays, **extra) -> int | None:
        import torch

        if not self.gpu_table(table) or (pool := self.device_pool(tensor.device)) is None:
            return None
        key = uuid.uuid4().hex
        arrays = {"ids": id_array, **{name: a for name, a in host_arrays.items() if a is not None}}
        dtype = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(tensor.dtype)
        if dtype is None or tensor.dim() != 2:
            raise InvalidArgumentError(message=f"{field}: expected a 2-d float32, float16 or bfloat16 tensor, got "
                                               f"{tensor.dtype} of shape {tuple(tensor.shape)}")

        def send(buffer) -> int:
            with self.pool.lease(region_bytes(*((a.shape, a.itemsize) for a in arrays.values()))) as segment:
                specs = {name: segment.put(a, name) for name, a in arrays.items()}
                view, specs[field] = buffer.array(tuple(tensor.shape), dtype)
                with torch.cuda.device(tensor.device):
                    view.copy_(tensor)
                    torch.cuda.current_stream().synchronize()     # written before the server reads
                return self._send_retried(method, kind(table=table, segment=segment.name, idempotency_key=key,
                                                       **specs, **extra))

        return self._through_buffer(pool, send, region_bytes((tuple(tensor.shape), tensor.element_size())))

    def _through_buffer(self, pool: SegmentPool, call: Callable, nbytes: int):
        """`call(buffer)` with a GPU buffer of this call's; once more with a new one if the server had
        closed the first (it keeps at most 64 idle ones open)."""
        for attempt in range(2):
            try:
                with pool.lease(nbytes) as buffer:
                    return call(buffer)
            except InvalidArgumentError as exc:
                if attempt or ".device_buffer: no GPU buffer" not in exc.message:
                    raise

    def _attach_buffer(self, buffer, token: bytes) -> str:
        with _rpc():
            answer = self._calls["AttachDeviceBuffer"](pb.AttachDeviceBufferRequest(
                buffer=buffer.name, handle=buffer.handle, size=buffer.size, device_uuid=buffer.uuid, token=token),
                timeout=self.timeout)
        return "" if answer.attached else answer.reason or "the server did not open the GPU buffer"
