"""Client calls for replication and delta checkpoints (mixed into KVStoreClient), and the CLI's
`kvstore export TABLE PATH --since SEQ` / chained `kvstore import`.

`subscribe` follows a server's change feed; `export_sequenced` streams a full export
(`since_sequence` None) or a delta, both naming the sequence they hold every change
up to; `import_chain` applies one link of a checkpoint chain. On disk a delta is an
ordinary export directory whose manifest adds `sequence`, `since_sequence`, `feed_id`
and a checksummed `tombstones.npy` (docs/replication.md).
"""
from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from kvstore_proto.export_format import ExportChunk, ExportFormatError, ExportReader, file_sha256
from kvstore_proto.tensors import WireError, decode_ids, decode_tensor, encode_ids
from kvstore_proto.v1 import kvstore_pb2 as pb

from .errors import InternalError
from .errors import rpc_errors as _rpc
from .progress import Progress
from .snapshots import IMPORT_MODES, ExportStream, _chunk, _config_message, _one_pass, decoded, rows_request
from .writes import RETRIES, streamed_write

TRANSFER_TIMEOUT = 24 * 3600.0
TOMBSTONES_FILE = "tombstones.npy"
TOMBSTONES_PER_MESSAGE = 1 << 18
_NO_IDS = np.zeros(0, np.int64)
_LAST_ROWS = pb.ImportChainRequest(rows=pb.ImportRequest(last=True)).SerializeToString()   # appended: merged


@dataclass
class ChangeBatch:
    """One Subscribe message: rows of `table` (or none), tombstones, and where the stream stands."""

    table: str
    ids: np.ndarray
    weights: np.ndarray | None
    state: np.ndarray | None
    tombstones: np.ndarray
    sequence: int
    batch_end: bool
    head_sequence: int
    oldest_change_time: float
    feed_id: str


@dataclass
class DeltaPart:
    ids: np.ndarray
    weights: np.ndarray | None
    state: np.ndarray | None
    meta: np.ndarray | None
    tombstones: np.ndarray


class SequencedExport(ExportStream):
    """A full or delta export; `config`, `sequence`, `since_sequence`, `feed_id` are known before the first part."""

    def __init__(self, responses):
        self._call = responses
        with _rpc():
            first = next(responses, None)
        super().__init__(itertools.chain([] if first is None else [first], responses))
        self._first_response = first
        self.sequence = self._head.sequence
        self.since_sequence = self._head.since_sequence if self._head.HasField("since_sequence") else None
        self.feed_id = self._head.feed_id

    def __iter__(self) -> Iterator[DeltaPart]:
        with _rpc():
            for response in itertools.chain([self._first_response], self._responses):
                part = _part(decoded(response)[1])
                if len(part.ids) or len(part.tombstones):
                    yield part

    def cancel(self) -> None:
        self._call.cancel()


def _part(arrays: dict[str, np.ndarray]) -> DeltaPart:
    rows = _chunk(arrays)
    return DeltaPart(rows.ids, rows.weights, rows.state, rows.meta, arrays.get("tombstones", _NO_IDS))


def _batch(response: pb.SubscribeResponse) -> ChangeBatch:
    try:
        weights = decode_tensor(response.weights, "weights") if response.HasField("weights") else None
        state = decode_tensor(response.state, "state") if response.HasField("state") else None
        return ChangeBatch(response.table, decode_ids(response.ids, "ids"), weights, state,
                           decode_ids(response.tombstones, "tombstones"), response.sequence, response.batch_end,
                           response.head_sequence, response.oldest_change_time, response.feed_id)
    except WireError as exc:
        raise InternalError(message=f"subscribe: malformed message: {exc}") from None


def _link(sequence: int, since_sequence: int | None) -> pb.ImportChainRequest:
    link = pb.ImportChainRequest(sequence=sequence)
    if since_sequence is not None:
        link.since_sequence = since_sequence
    return link


class ReplicationMethods:
    def subscribe(self, tables: Iterable[str] = (), from_sequence: int = -1, weights_only: bool = False,
                  interval_seconds: float = 0.0, feed_id: str = "", timeout: float | None = None
                  ) -> Iterator[ChangeBatch]:
        """Follow the change feed after `from_sequence` (-1: from now). The first batch names where the
        stream starts; FailedPreconditionError when the server no longer holds `from_sequence`."""
        request = pb.SubscribeRequest(tables=list(tables), from_sequence=from_sequence, weights_only=weights_only,
                                      interval_seconds=interval_seconds, feed_id=feed_id)
        responses = self._stub.Subscribe(request, timeout=timeout)
        try:
            with _rpc():
                for response in responses:
                    yield _batch(response)
        finally:
            responses.cancel()

    def export_sequenced(self, table: str, since_sequence: int | None = None, chunk_rows: int = 0,
                         timeout: float = TRANSFER_TIMEOUT) -> SequencedExport:
        """A full export (`since_sequence` None) or the rows changed after `since_sequence` plus tombstones."""
        request = pb.ExportRequest(table=table, chunk_rows=chunk_rows)
        if since_sequence is not None:
            request.since_sequence = since_sequence
        return SequencedExport(self._export(request, timeout=timeout))

    def import_chain(self, table: str, parts: Iterable[DeltaPart], sequence: int, since_sequence: int | None = None,
                     mode: str = "merge", config: dict | None = None, timeout: float = TRANSFER_TIMEOUT) -> int:
        """Apply one link of a checkpoint chain: a full export (no `since_sequence`) or a delta, which the
        server refuses (FailedPreconditionError naming both sequences) unless it starts where the last ended."""
        header = pb.ImportRequest(table=table, mode=IMPORT_MODES.get(mode, pb.IMPORT_MODE_UNSPECIFIED))
        if config is not None:
            header.config.CopyFrom(_config_message(config))
        link = _link(sequence, since_sequence)

        def requests(key: str) -> Iterator[bytes]:
            first = pb.ImportChainRequest(rows=header)    # the header travels alone: it carries no rows
            first.MergeFrom(link)
            first.rows.idempotency_key = key
            yield first.SerializeToString()
            tombstones = []
            for part in parts:
                tombstones.append(part.tombstones)
                if len(part.ids):
                    for ids, weights, state, meta in self._import_slices((part.ids, part.weights, part.state,
                                                                          part.meta)):
                        yield rows_request(ids, weights, state, meta, within=1)
            gone = np.concatenate(tombstones) if tombstones else _NO_IDS
            for start in range(0, len(gone), TOMBSTONES_PER_MESSAGE):
                yield pb.ImportChainRequest(
                    tombstones=encode_ids(gone[start:start + TOMBSTONES_PER_MESSAGE])).SerializeToString()

        return streamed_write(self._import_chain, requests, timeout, retries=0 if _one_pass(parts) else RETRIES,
                              marks=lambda request: request + _LAST_ROWS).rows


# --- CLI: `kvstore export --since`, chained `kvstore import` ----------------------------


def register(export: argparse.ArgumentParser) -> None:
    """Add `--since SEQ` to `kvstore export` (transfer_commands records and checks the sequences)."""
    export.add_argument("--since", type=int, metavar="SEQ", default=None,
                        help="a delta: only rows changed after sequence SEQ (from an earlier export's manifest)")


def sequence_fields(path: str, stream: SequencedExport, tombstones: list[np.ndarray]) -> dict:
    """The manifest fields of a sequenced export; a delta's tombstones are written beside its chunks."""
    extra = {"sequence": stream.sequence, "feed_id": stream.feed_id}
    if stream.since_sequence is not None:
        gone = np.concatenate(tombstones) if tombstones else _NO_IDS
        target = os.path.join(path, TOMBSTONES_FILE)
        np.save(target, gone.astype("<i8"))
        extra.update(since_sequence=stream.since_sequence,
                     tombstones={"file": TOMBSTONES_FILE, "rows": len(gone), "sha256": file_sha256(target)})
    return extra


def read_tombstones(reader: ExportReader) -> np.ndarray:
    """The ids a delta export deletes (checked against the manifest's checksum); none for a full export."""
    entry = reader.manifest.get("tombstones")
    if entry is None:
        return _NO_IDS
    path = os.path.join(reader.path, TOMBSTONES_FILE)
    if not isinstance(entry, dict) or entry.get("file") != TOMBSTONES_FILE or not os.path.isfile(path):
        raise ExportFormatError(f"{TOMBSTONES_FILE}: missing")
    if file_sha256(path) != entry.get("sha256"):
        raise ExportFormatError(f"{TOMBSTONES_FILE}: checksum mismatch (corrupt or changed)")
    gone = np.load(path, allow_pickle=False)
    if gone.shape != (int(entry.get("rows", -1)),):
        raise ExportFormatError(f"{TOMBSTONES_FILE}: expected {entry.get('rows')} ids, got shape {gone.shape}")
    return gone.astype(np.int64)


def import_sequenced(client, args: argparse.Namespace, reader: ExportReader,
                     chunks: Iterable[ExportChunk] | None = None) -> int:
    """`kvstore import` of an export with sequences: one ImportChain call (a delta is merged).
    `chunks`: the reader's chunks (e.g. read ahead on another thread); by default read in turn."""
    since = reader.manifest.get("since_sequence")
    gone = read_tombstones(reader)
    with Progress(f"import {args.table}", reader.rows, enabled=not args.quiet) as progress:

        def parts() -> Iterator[DeltaPart]:
            for chunk in reader if chunks is None else chunks:
                yield DeltaPart(chunk.ids, chunk.weights, chunk.state, chunk.meta, _NO_IDS)
                progress.update(len(chunk.ids))
            yield DeltaPart(_NO_IDS, None, None, None, gone)

        rows = client.import_chain(args.table, parts(), int(reader.manifest["sequence"]), since,
                                   mode="merge" if since is not None else args.mode, config=reader.table)
    kind = f"delta {since} -> {reader.manifest['sequence']}" if since is not None else "full"
    print(f"imported {rows:,} rows into {args.table} ({kind}, {len(gone):,} tombstones)")
    return 0
