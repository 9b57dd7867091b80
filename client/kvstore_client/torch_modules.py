"""PyTorch modules whose embedding rows live in kvstore.

`RemoteEmbedding` and `RemoteEmbeddingBag` behave like `nn.Embedding` and
`nn.EmbeddingBag` in forward; backward sends the rows' gradients to the server,
which applies the table's optimizer where the rows live. Dense parameters keep
their ordinary `torch.optim` optimizer.

Forward fetches each unique id once. With `prefetch(next_input)`, batch i+1's
rows are fetched in the background while batch i trains; rows that batch i's
gradients changed after that early read are fetched again before use, so the
result equals the unpipelined one.

Rows live on the input's device: with CUDA inputs they are fetched as CUDA tensors
(for a GPU table next to its server, written into this process's GPU memory by the
server itself: CUDA IPC, docs/same-host.md), pooled there, and their gradients are
pushed from there.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .client import KVStoreClient


class _Prefetched:
    def __init__(self, ids: np.ndarray, early: np.ndarray, future: Future):
        self.ids = ids                       # unique ids of the future batch
        self.early = early                   # the part fetched in the background
        self.future = future
        self.stale: list[np.ndarray] = []    # ids stepped after this read was issued


class _RemoteRows(nn.Module):
    """Shared machinery: unique-id fetch, gradient push, prefetch pipeline."""

    def __init__(self, client: KVStoreClient, table: str, on_miss: str = "init_insert", pin: bool = False):
        super().__init__()
        self.client = client
        self.table = table
        self.on_miss = on_miss
        self.pin = pin                       # also lock prefetched rows in the server's cache
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-prefetch")
        self._pending: _Prefetched | None = None
        self._in_flight = np.zeros(0, np.int64)        # ids whose gradients have not been pushed yet
        self._lock = threading.Lock()

    def prefetch(self, input: torch.Tensor) -> None:
        """Start fetching the rows of a future batch (call right after this batch's forward).
        Rows of the current batch are left out: its gradients will change them, so they are
        read when the future batch runs."""
        ids = np.unique(input.detach().cpu().numpy().astype(np.int64, copy=False).ravel())
        with self._lock:
            early = np.setdiff1d(ids, self._in_flight, assume_unique=True)
            self._pending = _Prefetched(ids, early, self._pool.submit(self._fetch, early, input.device))

    def _fetch(self, ids: np.ndarray, device: torch.device) -> torch.Tensor:
        if self.pin:
            self.client.prefetch(self.table, ids, lock=True)
        return self._lookup(ids, device)

    def _lookup(self, ids: np.ndarray, device: torch.device) -> torch.Tensor:
        """Rows of `ids` as float32 on `device` (CUDA ids bring CUDA rows: client.lookup)."""
        rows = self.client.lookup(self.table, torch.from_numpy(ids).to(device), on_miss=self.on_miss)
        return rows.to(torch.float32)

    def _rows(self, flat_ids: np.ndarray, device: torch.device) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """A leaf tensor of the unique rows on `device`, the unique ids, and each input id's index into them."""
        uniq, inverse = np.unique(flat_ids, return_inverse=True)
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and np.array_equal(pending.ids, uniq):
            early_rows = pending.future.result()
            stale = np.concatenate(pending.stale) if pending.stale else np.zeros(0, np.int64)
            ready = np.isin(uniq, pending.early, assume_unique=True) & ~np.isin(uniq, stale)
            rows = torch.empty((len(uniq), early_rows.shape[1]), dtype=torch.float32, device=device)
            at = torch.from_numpy(np.flatnonzero(ready)).to(device)
            rows[at] = early_rows[torch.from_numpy(np.searchsorted(pending.early, uniq[ready])).to(device)]
            if not ready.all():
                rows[torch.from_numpy(np.flatnonzero(~ready)).to(device)] = self._lookup(uniq[~ready], device)
        else:
            if pending is not None:
                pending.future.result()     # let a mismatched prefetch finish before reading
            rows = self._lookup(uniq, device)
        if torch.is_grad_enabled():
            with self._lock:
                self._in_flight = uniq      # their gradients are on the way
        weight = rows.requires_grad_(True)
        weight.register_hook(lambda grad, ids=uniq: self._push(ids, grad))
        return weight, uniq, inverse

    def _push(self, ids: np.ndarray, grad: torch.Tensor) -> None:
        with self._lock:
            if self._pending is not None:
                self._pending.stale.append(ids)
            self._in_flight = np.zeros(0, np.int64)
        grad = grad.detach().to(torch.float32)
        self.client.apply_gradients(self.table, ids, grad if grad.is_cuda else grad.numpy(), release=self.pin)


    # --- checkpoints: the table's rows travel through export/import -----------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        save_table(self.client, self.table, destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        with self._lock:
            self._pending = None              # rows read before the load are stale
        load_table(self.client, self.table, state_dict, prefix, missing_keys)


class RemoteEmbedding(_RemoteRows):
    """`nn.Embedding` over a kvstore table: output[..., :] = row of input[...]."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        flat = input.detach().cpu().numpy().astype(np.int64, copy=False).ravel()
        weight, _, inverse = self._rows(flat, input.device)
        index = torch.from_numpy(inverse.astype(np.int64)).reshape(input.shape).to(input.device)
        return F.embedding(index, weight)


class RemoteEmbeddingBag(_RemoteRows):
    """`nn.EmbeddingBag` over a kvstore table: sum or mean pooling, `offsets` and
    `per_sample_weights` as in torch."""

    def __init__(self, client: KVStoreClient, table: str, mode: str = "mean", **kwargs):
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode: expected 'sum' or 'mean', got {mode!r}")
        super().__init__(client, table, **kwargs)
        self.mode = mode

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        flat = input.detach().cpu().numpy().astype(np.int64, copy=False).ravel()
        weight, _, inverse = self._rows(flat, input.device)
        index = torch.from_numpy(inverse.astype(np.int64)).reshape(input.shape).to(input.device)
        return F.embedding_bag(index, weight, None if offsets is None else offsets.to(input.device), mode=self.mode,
                               per_sample_weights=None if per_sample_weights is None
                               else per_sample_weights.to(input.device))


STATE_KEYS = ("ids", "weight", "optimizer_state", "row_meta")


def save_table(client: KVStoreClient, table: str, destination: dict, prefix: str) -> None:
    """The whole table at this instant (one consistent export) into a state dict, as tensors:
    ids [n], weight [n, dim], optimizer_state [n, state_dim], row_meta [n, 3]."""
    rows = client.export_table(table)
    for key, array in zip(STATE_KEYS, (rows.ids, rows.weights, rows.state, rows.meta), strict=True):
        destination[prefix + key] = torch.from_numpy(np.ascontiguousarray(array))


def load_table(client: KVStoreClient, table: str, state_dict: dict, prefix: str, missing_keys: list) -> None:
    """Replace the table's rows with a state dict's (import mode `replace`), optimizer state and
    row metadata included; names the keys it lacks in `missing_keys` and changes nothing then."""
    present = [prefix + key in state_dict for key in STATE_KEYS]
    if not all(present):
        missing_keys.extend(prefix + k for k, here in zip(STATE_KEYS, present, strict=True) if not here)
        return
    arrays = [state_dict[prefix + key].detach().cpu().numpy() for key in STATE_KEYS]
    client.import_table(table, arrays[0], arrays[1], arrays[2], mode="replace", meta=arrays[3])
