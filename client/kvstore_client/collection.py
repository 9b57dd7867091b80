"""Several embedding-bag features over kvstore tables, one round trip per training step.

`RemoteEmbeddingBagCollection` is the kvstore counterpart of TorchRec's
`EmbeddingBagCollection`: a forward takes every feature of a batch (a dict of
feature name -> ids) and returns the pooled embeddings per feature. Ids are
de-duplicated once per table (features may share a table), all tables' rows come
in one request, and backward sends all tables' gradients in one request on the
same ordered stream (`TrainingStream`).

With `pipeline=True` (the default) backward does not wait for the server: the
gradients travel while the caller runs its dense optimizer step and loads the next
batch, and the next forward's lookup, sent behind them on the same stream, still
sees them applied. Results are exactly those of a loop that waits (`pipeline=False`).
Call `flush()` before reading the tables another way (evaluation from another
client; `state_dict` flushes itself). A failed gradient push is raised by the next
forward or `flush()`.

`next_batch(batch)`, called after a step's forward, sends the next forward's lookup at
once, so the server answers it while the caller runs its backward and dense step. The
step's gradients then carry a lookup of the rows they change that the next batch also
reads (`_Ahead`): those rows are read again behind the gradients and replace the early
ones, so the result is still exactly the waiting loop's (other rows are not changed by
this trainer's step). `forward(batch, next_batch=...)` names it earlier still: its lookup
goes out before this forward waits for its own rows, so the server reads it during the
whole step and the step's gradients seldom queue behind it (same results).

`staleness=k` (default 0: exact) lets a forward run up to k steps ahead of the
gradient pushes: its lookups go on a second stream and wait only until the pushes
of all steps but the last k are applied, so the server's optimizer step of step i
no longer lies between step i's backward and step i+1's forward. A row then reads
as of some step between i-k and i (each row whole: its update is atomic); the
losses differ from the exact loop's. Over a ShardedClient, each shard has its own
streams and the same promises hold per row (sharded_training.py).

For a model on a GPU, rows land in pinned host memory and go up without blocking;
pooling runs on the device, and gradients come down into pinned memory
(host_staging.py). A GPU table on a server on the same machine (`same_host`) skips
the host: the server writes the rows into this process's GPU memory and reads the
gradients from it (CUDA IPC, docs/same-host.md).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .client import KVStoreClient
from .host_staging import HostStaging, to_host
from .sharded_training import open_training_stream
from .torch_modules import load_table, save_table
from .training_stream import TrainStep

MODES = ("sum", "mean")


@dataclass(frozen=True)
class Feature:
    """One input feature: its ids index `table`; bags are pooled by `mode`."""

    name: str
    table: str
    mode: str = "mean"


FeatureIds = torch.Tensor | tuple[torch.Tensor, torch.Tensor]   # [B, L] ids, or (flat ids, offsets [B])


class RemoteEmbeddingBagCollection(nn.Module):
    """Pooled embeddings of several features over kvstore tables; one request per step each way."""

    def __init__(self, client: KVStoreClient, features: list[Feature], on_miss: str = "init_insert",
                 pipeline: bool = True, staleness: int = 0):
        """`client`: one server or a ShardedClient. `pipeline`: backward does not wait for the
        server (results unchanged). `staleness`: steps a forward may run ahead of the gradient
        pushes (0, the default, is exact; more needs `pipeline`)."""
        super().__init__()
        names = [f.name for f in features]
        if not features or len(set(names)) != len(names):
            raise ValueError(f"features: expected distinct names, got {names}")
        for feature in features:
            if feature.mode not in MODES:
                raise ValueError(f"features[{feature.name!r}].mode: expected one of {MODES}, got {feature.mode!r}")
        self.features = list(features)
        self.tables = list(dict.fromkeys(f.table for f in features))
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise ValueError(f"staleness: expected a non-negative integer, got {staleness!r}")
        if staleness and not pipeline:
            raise ValueError("staleness: needs pipeline=True (a loop that waits for every push is exact)")
        self.on_miss = on_miss
        self.pipeline = pipeline
        self.staleness = staleness
        self.stream = open_training_stream(client)                  # gradients, prefetches (and lookups when exact)
        self._reads = open_training_stream(client) if staleness else self.stream
        self._pushes: deque[TrainStep] = deque()                   # unanswered pushes, with staleness
        self._staging: HostStaging | None = None                   # pinned buffers, for CUDA features
        self._grads: dict[str, list[tuple[np.ndarray, np.ndarray | torch.Tensor]]] = {}   # not sent yet
        self._on_device: dict[tuple[str, torch.device], bool] = {}      # (table, device) -> through CUDA IPC
        self._waiting = 0                     # leaves of the last forward whose gradients are due
        self._ahead: _Ahead | None = None     # the next forward's batch, named by next_batch

    def forward(self, batch: dict[str, FeatureIds], next_batch: dict[str, FeatureIds] | None = None
                ) -> dict[str, torch.Tensor]:
        """Pooled embeddings [B, dim] per feature, on the device of the feature's ids. `next_batch`:
        the following forward's batch, named as `next_batch()` names it but before this forward
        waits for its rows, so the server reads them during this whole step (exact as well)."""
        _check_features(self.features, batch, "batch")
        if next_batch is not None:
            _check_features(self.features, next_batch, "next_batch")
        self._push()                          # gradients held back (a backward that left some leaf out)
        self._waiting = 0
        flat = {f.name: _flat_ids(batch[f.name]) for f in self.features}
        uniq, inverse, step = self._lookup(flat)
        if next_batch is not None:            # exact: sent now; with staleness: behind this step's gradients
            self._name_next(next_batch, send=False)
            if not self.staleness:
                self._send_ahead()
        devices = {f.table: flat[f.name][3] for f in reversed(self.features)}    # a table's first feature's
        staging = self._host_staging(devices.values())
        _, rows = step.result(staging.allocate) if staging else step.result()
        weights = {table: self._leaf(table, uniq[table], rows[table], devices[table]) for table in self.tables}
        out = {}
        for feature in self.features:
            _, offsets, shape, device = flat[feature.name]
            weight = weights[feature.table]
            index = torch.from_numpy(inverse[feature.name]).reshape(shape).to(weight.device)
            offsets = None if offsets is None else offsets.to(weight.device)
            out[feature.name] = F.embedding_bag(index, weight, offsets, mode=feature.mode).to(device)
        return out

    def next_batch(self, batch: dict[str, FeatureIds]) -> None:
        """Name the next forward's batch (call after this step's forward): its lookup is sent now, so
        the server answers it while the caller runs backward and its dense step, and the next forward
        finds the rows on their way. Exact: the rows that this step's gradients change are read
        again behind them. With staleness, the lookup goes behind the gradients instead. A next
        forward with other ids looks them up as usual."""
        self._name_next(batch, send=self._waiting <= 0 or not self.staleness)   # staleness: after the gradients

    def _name_next(self, batch: dict[str, FeatureIds], send: bool) -> None:
        flat = {f.name: _flat_ids(batch[f.name]) for f in self.features}
        self._ahead = _Ahead(flat, *self._dedupe(flat))
        if send:
            self._send_ahead()

    def prefetch(self, batch: dict[str, FeatureIds]) -> None:
        """Warm the server's cache with the rows of a later batch (say step i+2's), behind the
        steps already sent; nothing waits and no result changes (rows are read when used)."""
        uniq, _ = self._dedupe({f.name: _flat_ids(batch[f.name]) for f in self.features})
        self.stream.send(prefetches=uniq)

    def flush(self) -> None:
        """Send gradients still held and wait until the server has applied every step."""
        self._push()
        self._pushes.clear()
        self.stream.flush()
        if self._reads is not self.stream:
            self._reads.flush()

    def close(self) -> None:
        self.flush()
        self._ahead = None            # a next batch no forward read: its rows hold shared memory
        self.stream.close()
        if self._reads is not self.stream:
            self._reads.close()

    # --- checkpoints: each table's rows under `<prefix><table>.`, as RemoteEmbeddingBag keeps them ---

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        self.flush()                                   # every step applied before the export
        for table in self.tables:
            save_table(self.stream.client, table, destination, f"{prefix}{table}.")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self.flush()
        for table in self.tables:
            load_table(self.stream.client, table, state_dict, f"{prefix}{table}.", missing_keys)

    def _lookup(self, flat: dict) -> tuple[dict, dict, TrainStep | _Ahead]:
        """Unique ids, inverse indices and the lookup step of a forward's batch: the one sent ahead
        by `next_batch` when its ids are these, else one sent now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.same_ids(flat):
            if ahead.step is None:
                self._send_ahead(ahead)
            return ahead.uniq, ahead.inverse, ahead
        if ahead is not None and ahead.step is not None:
            ahead.wait()                      # answers nobody reads: consumed in order, errors raised
        uniq, inverse = self._dedupe(flat)
        while len(self._pushes) > self.staleness:                 # at most `staleness` pushes unapplied
            self._pushes.popleft().wait()
        return uniq, inverse, self._reads.send(lookups=uniq, on_miss=self.on_miss, device=_gpu(flat))

    def _send_ahead(self, ahead: _Ahead | None = None) -> None:
        ahead = ahead or self._ahead
        if ahead is not None and ahead.step is None:
            while len(self._pushes) > self.staleness:
                self._pushes.popleft().wait()
            ahead.step = self._reads.send(lookups=ahead.uniq, on_miss=self.on_miss, device=_gpu(ahead.flat))

    def _dedupe(self, flat: dict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Unique ids per table, and each feature's index into its table's unique rows."""
        uniq, inverse = {}, {}
        for table in self.tables:
            names = [f.name for f in self.features if f.table == table]
            ids = [flat[name][0] for name in names]
            uniq[table], index = np.unique(np.concatenate(ids) if len(ids) > 1 else ids[0], return_inverse=True)
            bounds = np.cumsum([0] + [len(i) for i in ids])
            for name, start, stop in zip(names, bounds[:-1], bounds[1:], strict=True):
                inverse[name] = index[start:stop].astype(np.int64, copy=False)
        return uniq, inverse

    def _host_staging(self, devices) -> HostStaging | None:
        """Pinned buffers when a feature is on a GPU; last forward's are let go first."""
        if self._staging is not None:
            self._staging.release()
        if not any(device.type == "cuda" for device in devices):
            return None
        self._staging = self._staging or HostStaging()
        return self._staging

    def _leaf(self, table: str, ids: np.ndarray, rows, device: torch.device) -> torch.Tensor:
        """The rows as a tensor that collects their gradient, on the device of the table's feature
        (rows the server wrote into GPU memory are there already)."""
        if isinstance(rows, torch.Tensor):
            weight = rows.to(device=device, dtype=torch.float32)
        else:
            if rows.dtype != np.float32:                  # float16/bfloat16 tables: float32 for the model
                rows = rows.astype(np.float32)
            weight = torch.from_numpy(rows)
            if device.type == "cuda" and self._staging is not None:
                weight = self._staging.upload(weight, device)
        if torch.is_grad_enabled():
            weight.requires_grad_(True)
            weight.register_hook(lambda grad: self._collect(table, ids, grad))
            self._waiting += 1
        return weight

    def _collect(self, table: str, ids: np.ndarray, grad: torch.Tensor) -> None:
        """A leaf's gradient; the step's request goes once every leaf of the forward has one
        (several forwards before one backward: every gradient is kept and sent)."""
        keep = grad.is_cuda and self._through_ipc(table, grad.device)
        self._grads.setdefault(table, []).append((ids, grad.detach().float() if keep else to_host(grad)))
        self._waiting -= 1
        if self._waiting <= 0:
            self._push()

    def _through_ipc(self, table: str, device: torch.device) -> bool:
        """Whether `table`'s gradients on `device` go to the server through a GPU buffer (CUDA IPC)."""
        key = (table, device)
        if key not in self._on_device:
            same_host = getattr(self.stream.client, "same_host", None)       # a ShardedClient has none
            self._on_device[key] = bool(same_host is not None and same_host.usable() and same_host.gpu_table(table)
                                        and same_host.device_pool(device) is not None)
        return self._on_device[key]

    def _push(self) -> TrainStep | None:
        """One request with every table's gradients of the step; waits for it unless pipelining."""
        held, self._grads = self._grads, {}
        if not held:
            return None
        grads = {table: _joined(parts) for table, parts in held.items()}     # the server sums duplicates
        ahead = self._ahead if self._ahead is not None and self._ahead.step is not None else None
        stale = ahead.rows_changed_by(grads) if ahead is not None and not self.staleness else {}
        step = self.stream.send(gradients=grads, lookups={table: ahead.uniq[table][at] for table, at in stale.items()},
                                on_miss=self.on_miss)
        if stale:
            ahead.refreshed.append((step, stale))
        if not self.pipeline:
            step.wait()
        elif self.staleness:
            self._pushes.append(step)
        if self._waiting <= 0:
            self._send_ahead()                # the next batch's lookup, right behind these gradients
        return step


@dataclass
class _Ahead:
    """The next forward's batch: its ids per feature, deduplicated, and its lookup once sent.
    A lookup sent before gradients of this trainer reads some rows as they were before those
    gradients; each such push also looks up those rows (`rows_changed_by`), and the answers
    replace them in order (`result`)."""

    flat: dict
    uniq: dict[str, np.ndarray]
    inverse: dict[str, np.ndarray]
    step: TrainStep | None = None
    refreshed: list[tuple[TrainStep, dict[str, np.ndarray]]] = field(default_factory=list)

    def rows_changed_by(self, grads: dict[str, tuple[np.ndarray, object]]) -> dict[str, np.ndarray]:
        """Per table, the positions in `uniq` of ids that `grads` step (only tables with any)."""
        changed = {}
        for table, (ids, _) in grads.items():
            uniq = self.uniq.get(table)
            if uniq is None or not len(uniq) or not len(ids):
                continue
            at = np.minimum(np.searchsorted(uniq, ids), len(uniq) - 1)    # uniq is sorted (np.unique)
            at = at[uniq[at] == ids]
            if len(at):
                changed[table] = np.unique(at)
        return changed

    def result(self, allocate=np.empty) -> tuple[dict[str, int], dict]:
        """The lookup's (stepped, rows), each refreshed row replaced by its later read."""
        stepped, rows = self.step.result(allocate)
        for step, changed in self.refreshed:
            _, fresh = step.result()
            for table, at in changed.items():
                _replace(rows[table], at, fresh[table])
        return stepped, rows

    def wait(self) -> None:
        self.step.wait()
        for step, _ in self.refreshed:
            step.wait()

    def same_ids(self, flat: dict) -> bool:
        return all(np.array_equal(self.flat[name][0], ids) and _same_offsets(self.flat[name][1], offsets)
                   and self.flat[name][2] == shape for name, (ids, offsets, shape, _) in flat.items())


def _check_features(features: list[Feature], batch: dict, where: str) -> None:
    missing = [f.name for f in features if f.name not in batch]
    if missing:
        raise KeyError(f"{where}: missing features {missing}")


def _replace(rows, at: np.ndarray, fresh) -> None:
    """rows[at] = fresh, each in host memory (NumPy) or in GPU memory the server wrote (torch)."""
    if isinstance(rows, torch.Tensor):
        fresh = fresh if isinstance(fresh, torch.Tensor) else torch.from_numpy(fresh)
        rows[torch.from_numpy(at).to(rows.device)] = fresh.to(rows.device, rows.dtype)
    else:
        rows[at] = to_host(fresh) if isinstance(fresh, torch.Tensor) else fresh


def _same_offsets(mine: torch.Tensor | None, theirs: torch.Tensor | None) -> bool:
    return (mine is None) == (theirs is None) and (mine is None or torch.equal(mine.cpu(), theirs.cpu()))


def _joined(parts: list[tuple[np.ndarray, np.ndarray | torch.Tensor]]) -> tuple[np.ndarray, np.ndarray | torch.Tensor]:
    if len(parts) == 1:
        return parts[0]
    ids = np.concatenate([ids for ids, _ in parts])
    if all(isinstance(grads, torch.Tensor) for _, grads in parts):
        return ids, torch.cat([grads for _, grads in parts])
    return ids, np.concatenate([to_host(grads) if isinstance(grads, torch.Tensor) else grads for _, grads in parts])


def _gpu(flat: dict) -> torch.device | None:
    """The CUDA device of a batch's features (the first one's), where its rows are wanted; None on the CPU."""
    return next((device for _, _, _, device in flat.values() if device.type == "cuda"), None)


def _flat_ids(ids: FeatureIds) -> tuple[np.ndarray, torch.Tensor | None, tuple, torch.device]:
    """(flat int64 ids, offsets or None, the index shape for embedding_bag, the ids' device)."""
    if isinstance(ids, tuple):
        values, offsets = ids
        return _numpy_ids(values).ravel(), offsets, (values.numel(),), values.device
    if ids.dim() != 2:
        raise ValueError(f"batch: ids must be [batch, bag] or (flat ids, offsets), got shape {tuple(ids.shape)}")
    return _numpy_ids(ids).ravel(), None, tuple(ids.shape), ids.device


def _numpy_ids(ids: torch.Tensor) -> np.ndarray:
    return to_host(ids).astype(np.int64, copy=False)
