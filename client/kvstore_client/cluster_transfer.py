"""Cluster snapshots, export and import (mixed into ShardedClient).

A cluster snapshot is one name on every shard, taken at once; each shard's
copy is a consistent cut of that shard (pause writers between training steps
for one cut across shards). Create is all-or-none: if a shard fails, the copies
the others made are deleted. Restore is all-or-none as far as a client can make
it (docs/scale-out.md): every shard must hold the snapshot; each shard first
takes an undo snapshot of its live data; if any shard's restore fails, the
shards already restored are put back on their undo snapshot and the error
names every shard and the state it was left in.
"""
from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
import numpy as np
from kvstore_proto.export_format import ExportChunk

from .arrays import as_ids, to_numpy
from .errors import InvalidArgumentError, KVStoreError, NotFoundError
from .snapshots import TRANSFER_TIMEOUT, ExportStream

_END = object()
FEED_DEPTH = 4            # chunks queued per shard while importing


def _merge_snapshots(name: str, infos: list[dict]) -> dict:
    rows: dict[str, int] = {}
    for info in infos:
        for table, count in info["rows"].items():
            rows[table] = rows.get(table, 0) + count
    first = infos[0]
    return {"name": name, "created_at": min(i["created_at"] for i in infos), "format_version": first["format_version"],
            "tables": first["tables"], "rows": rows, "pause_seconds": max(i["pause_seconds"] for i in infos),
            "duration_seconds": max(i["duration_seconds"] for i in infos), "shards": infos}


class ClusterExportStream:
    """Every shard's rows of a table: shard 0's chunks (in id order), then shard 1's, ... Each shard's
    view is taken when the stream opens, all at once."""

    def __init__(self, streams: list[ExportStream]):
        self.streams = streams
        self.config = streams[0].config
        self.state_dim = streams[0].state_dim
        self.estimated_rows = sum(s.estimated_rows for s in streams)

    def __iter__(self) -> Iterator[ExportChunk]:
        for stream in self.streams:
            yield from stream

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()


class ClusterTransferMethods:
    # --- snapshots -------------------------------------------------------------

    def create_snapshot(self, name: str) -> dict:
        """The snapshot `name` on every shard, or on none: copies made before a shard failed are deleted."""
        outcomes = self.fan.settle(lambda i: self.shards[i].create_snapshot(name))
        made = [i for i, r in outcomes.items() if not isinstance(r, KVStoreError)]
        if len(made) < len(self.shards):
            self.fan.settle(lambda i: self.shards[i].delete_snapshot(name), made)
            self.fan.raise_failures(outcomes)
        return _merge_snapshots(name, [outcomes[i] for i in range(len(self.shards))])

    def list_snapshots(self) -> list[dict]:
        """Snapshots present on every shard, merged (rows summed); a name on some shards only is left out."""
        listed = self.fan.each(lambda i: {s["name"]: s for s in self.shards[i].list_snapshots()})
        names = [n for n in listed[0] if all(n in by_name for by_name in listed.values())]
        return [_merge_snapshots(n, [listed[i][n] for i in range(len(self.shards))]) for n in names]

    def delete_snapshot(self, name: str) -> None:
        """Delete on every shard; NOT_FOUND only when no shard had it."""
        outcomes = self.fan.settle(lambda i: self.shards[i].delete_snapshot(name))
        if not all(isinstance(r, NotFoundError) for r in outcomes.values()):
            outcomes = {i: r for i, r in outcomes.items() if not isinstance(r, NotFoundError)}
        self.fan.raise_failures(outcomes)

    def restore_snapshot(self, name: str) -> dict:
        """Make snapshot `name` the live data of every shard, or of none (see the module docstring)."""
        listed = self.fan.each(lambda i: [s["name"] for s in self.shards[i].list_snapshots()])
        lacking = [i for i, names in listed.items() if name not in names]
        if lacking:
            where = ", ".join(f"shard {i} ({self.addresses[i]})" for i in lacking)
            raise NotFoundError(message=f"name: snapshot {name!r} is missing on {where}; nothing was restored",
                                reason="snapshot_not_found")
        undo = f"undo-restore-{uuid.uuid4().hex[:12]}"
        self.create_snapshot(undo)
        outcomes = self.fan.settle(lambda i: self.shards[i].restore_snapshot(name))
        if all(not isinstance(r, KVStoreError) for r in outcomes.values()):
            self.fan.settle(lambda i: self.shards[i].delete_snapshot(undo))
            merged = _merge_snapshots(name, [outcomes[i] for i in range(len(self.shards))])
            merged["restore_seconds"] = max(r["restore_seconds"] for r in outcomes.values())
            return merged
        self._roll_back(name, undo, outcomes)
        raise AssertionError("unreachable")      # _roll_back always raises

    def _roll_back(self, name: str, undo: str, outcomes: dict[int, Any]) -> None:
        """Put every shard back on the undo snapshot (a failed restore may have happened after all when the
        shard's answer was lost), then raise the restore's error naming where each shard is."""
        back = self.fan.settle(lambda i: self.shards[i].restore_snapshot(undo))
        stuck = [i for i, r in back.items() if isinstance(r, KVStoreError)]
        if stuck:
            state = (f"shards {stuck} could not be put back and may serve either {name!r} or their data before the "
                     f"restore: restore {name!r} again, or restore {undo!r} on the cluster, once they are up")
        else:
            state = f"every shard serves its data from before the restore again (undo snapshot {undo!r} is kept)"
        try:
            self.fan.raise_failures(outcomes)
        except KVStoreError as error:
            error.message = f"restore of {name!r} failed, {state}: {error.message}"
            error.args = (error.message,)
            raise

    # --- export and import --------------------------------------------------------

    def export(self, table: str, chunk_rows: int = 0, timeout: float = TRANSFER_TIMEOUT) -> ClusterExportStream:
        """Every row of `table`: each shard's rows in id order, shard after shard (not one global order)."""
        streams = self.fan.each(lambda i: self.shards[i].export(table, chunk_rows, timeout))
        return ClusterExportStream([streams[i] for i in range(len(self.shards))])

    def export_table(self, table: str) -> ExportChunk:
        """The whole table in memory, sorted by id: ids [n], weights [n, dim], state, meta."""
        parts = list(self.fan.each(lambda i: self.shards[i].export_table(table)).values())
        ids = np.concatenate([p.ids for p in parts])
        order = np.argsort(ids, kind="stable")
        return ExportChunk(*(np.concatenate([getattr(p, f) for p in parts])[order]
                             for f in ("ids", "weights", "state", "meta")))

    def import_table(self, table: str, ids: Any, weights: Any, state: Any = None, mode: str = "merge",
                     meta: Any = None, config: dict | None = None) -> int:
        """Whole arrays into `table`, each row to its shard. Returns the rows imported."""
        id_array = as_ids(ids)
        arrays = _per_row(len(id_array), (weights, "weights"), (state, "state"), (meta, "meta"))
        parts = self.shard_map.split(id_array)
        return sum(self.fan.each(lambda i: self.shards[i].import_table(
            table, id_array[parts[i]], *[None if a is None else a[parts[i]] for a in arrays[:2]], mode=mode,
            meta=None if arrays[2] is None else arrays[2][parts[i]], config=config)).values())

    def import_chunks(self, table: str, parts: Iterable[ExportChunk | tuple], mode: str = "merge",
                      config: dict | None = None, timeout: float = TRANSFER_TIMEOUT,
                      shards: list[int] | None = None) -> int:
        """Stream chunks into `table`, each row to its shard, one import stream per shard at once. Each shard
        applies its part only once all of it arrived valid; shards commit independently (docs/scale-out.md).
        `shards`: import only into these (rows of the others are skipped), e.g. to refill one lost shard."""
        chosen = range(len(self.shards)) if shards is None else sorted(set(shards))
        feeds = {i: queue.Queue(FEED_DEPTH) for i in chosen}
        failed = threading.Event()
        imported: dict[int, Any] = {}

        def run(index: int) -> None:
            try:
                imported[index] = self.shards[index].import_chunks(table, _drain(feeds[index]), mode, config, timeout)
            except KVStoreError as error:
                imported[index] = error
                failed.set()

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in feeds]
        for thread in threads:
            thread.start()
        try:
            for part in parts:
                chunk = part if isinstance(part, ExportChunk) else ExportChunk(*part, *[None] * (4 - len(part)))
                chunk_ids = as_ids(chunk.ids)
                arrays = [chunk_ids, *_per_row(len(chunk_ids), (chunk.weights, "weights"), (chunk.state, "state"),
                                               (chunk.meta, "meta"))]
                for index, at in enumerate(self.shard_map.split(chunk_ids)):
                    if len(at) and index in feeds:
                        _feed(feeds[index], tuple(None if a is None else a[at] for a in arrays), failed)
            for feed in feeds.values():
                _feed(feed, _END, failed)
        except BaseException as error:
            for feed in feeds.values():
                _abort(feed, error)              # each shard's stream is cancelled: nothing is applied there
            for thread in threads:
                thread.join()
            if isinstance(error, _ShardFailed):
                self.fan.raise_failures(_first_causes(imported))
            raise
        for thread in threads:
            thread.join()
        self.fan.raise_failures(_first_causes(imported))
        return sum(imported.values())


def _per_row(n: int, *named: tuple[Any, str]) -> list[np.ndarray | None]:
    """Arrays with one row per id (None stays None), so each can be split by shard like the ids."""
    arrays = [None if a is None else to_numpy(a, field) for a, field in named]
    for array, (_, field) in zip(arrays, named, strict=True):
        if array is not None and (array.ndim < 1 or len(array) != n):
            raise InvalidArgumentError(message=f"{field}: expected one row per id ({n}), got shape {array.shape}")
    return arrays


class _ShardFailed(Exception):
    """A shard's import failed: stop feeding the others."""


def _first_causes(outcomes: dict[int, Any]) -> dict[int, Any]:
    """The shards' errors without the cancellations this client caused after the first failure."""
    errors = {i: r for i, r in outcomes.items() if isinstance(r, KVStoreError)}
    causes = {i: r for i, r in errors.items() if r.code != grpc.StatusCode.CANCELLED}
    return causes or errors


def _feed(feed: queue.Queue, item: Any, failed: threading.Event) -> None:
    """Queue a chunk for one shard's import, waiting while it is full, unless some shard's import failed."""
    while True:
        if failed.is_set():
            raise _ShardFailed()
        try:
            feed.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _abort(feed: queue.Queue, error: BaseException) -> None:
    """Replace whatever one shard has not read yet with the error that ends its stream."""
    while True:
        try:
            feed.get_nowait()
        except queue.Empty:
            break
    feed.put_nowait(error)


def _drain(feed: queue.Queue) -> Iterator[tuple]:
    while True:
        item = feed.get()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
