"""Pinned host memory between a CUDA model and the wire: one copy each way, by DMA.

For a model on a GPU, looked-up rows are copied once from the received bytes
into pinned host memory (reassembly.py writes them there) and uploaded to the
device without blocking; gradients and ids come down into pinned memory, which
the encoder reads in place. Pageable memory would cost CUDA a staging copy each
way and make uploads synchronous. Without CUDA nothing here is used.
"""
from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    """Pinned buffers of one forward's rows, held until their uploads have finished."""

    def __init__(self) -> None:
        self._held: list[torch.Tensor] = []
        self._uploaded: torch.cuda.Event | None = None

    def allocate(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        """A pinned array (an `Allocate` for Reassembly): the rows land here straight from the answer."""
        dtype = np.dtype(dtype)
        buffer = torch.empty(int(np.prod(shape)) * dtype.itemsize, dtype=torch.uint8, pin_memory=True)
        self._held.append(buffer)
        return buffer.numpy().view(dtype).reshape(shape)

    def upload(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`rows` (in a pinned buffer of this staging) on `device`; the copy runs behind the caller."""
        on_device = rows.to(device, non_blocking=True)
        self._uploaded = torch.cuda.Event()
        self._uploaded.record(torch.cuda.current_stream(device))
        return on_device

    def release(self) -> None:
        """Let the buffers go once their uploads are done (call before the next forward's)."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
        self._held.clear()
        self._uploaded = None


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy array of a tensor's values: the tensor itself when on the CPU, else one DMA copy
    into pinned memory."""
    tensor = tensor.detach()
    if not tensor.is_cuda:
        return tensor.numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host.numpy()
