"""`kvstore export` and `kvstore import`: a table to an export directory and back.

Both run as a two-stage pipeline so the network and the disk work at once: export
receives chunk N+1 while a writer thread writes (and hashes, as the bytes pass)
file N; import reads and checks file N+1 while gRPC sends file N. A bounded number
of chunks waits between the stages, so memory stays flat whatever the table size.
"""
from __future__ import annotations

import argparse
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from kvstore_proto.export_format import ExportChunk, ExportReader, ExportWriter
from kvstore_proto.freed_memory import keep_freed_memory

from .client import KVStoreClient
from .progress import Progress
from .replication import import_sequenced, sequence_fields

T = TypeVar("T")
DEPTH = 24         # stream chunks (about 2 MiB each) in flight between the stages of an export: while the
                   # writer writes one 64 MiB file (about 70 ms), the stream goes on receiving
FILES_AHEAD = 2    # chunk files (about 64 MiB each) an import reads ahead of the stream


def chunk_bytes(chunk: ExportChunk) -> int:
    return chunk.ids.nbytes + chunk.weights.nbytes + chunk.state.nbytes + chunk.meta.nbytes


class Pipeline:
    """Runs `work(item)` on one background thread, at most `depth` items behind the caller;
    an error there is raised to the caller at its next `put` or at `finish`."""

    def __init__(self, work: Callable[[ExportChunk], object], depth: int = DEPTH):
        self.work, self.depth = work, depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-pipeline")
        self._pending: deque[Future] = deque()

    def put(self, item: ExportChunk) -> None:
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self.work, item))

    def finish(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            for future in self._pending:
                future.cancel()
        self._pool.shutdown(wait=True)


def read_ahead(items: Iterator[T], depth: int = DEPTH) -> Iterator[T]:
    """The items of `items`, produced on a background thread up to `depth` ahead of the consumer."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-read-ahead")
    pending: deque[Future] = deque()
    done = object()
    try:
        while True:
            while len(pending) < depth:
                pending.append(pool.submit(next, items, done))
            item = pending.popleft().result()
            if item is done:
                return
            yield item
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)


def export_table(client: KVStoreClient, args: argparse.Namespace) -> int:
    """A full export, or with `--since SEQ` a delta (rows changed after SEQ plus tombstones); both
    record the change-feed sequence they hold every change up to (docs/replication.md)."""
    keep_freed_memory()          # each received message reuses freed memory instead of faulting in fresh pages
    stream = client.export_sequenced(args.table, getattr(args, "since", None))
    config = stream.config
    writer = ExportWriter(args.path, config, config["dim"], config["dtype"] or "float32", stream.state_dim)
    tombstones = []
    with Progress(f"export {args.table}", stream.estimated_rows, enabled=not args.quiet) as progress:
        try:
            with Pipeline(lambda c: writer.write(c.ids, c.weights, c.state, c.meta)) as pipeline:
                for part in stream:
                    pipeline.put(part)
                    tombstones.append(part.tombstones)
                    progress.update(len(part.ids), chunk_bytes(part))
                pipeline.finish()
        except BaseException:
            stream.cancel()
            raise
        manifest = writer.close(sequence_fields(args.path, stream, tombstones))
    kind = f"delta since {stream.since_sequence}" if stream.since_sequence is not None else "full"
    print(f"exported {manifest['rows']:,} rows of {args.table} to {args.path} ({kind}, sequence {stream.sequence})")
    return 0


def import_table(client: KVStoreClient, args: argparse.Namespace) -> int:
    """Each chunk file is checked against its checksum as the next is read (`ExportReader.streamed`):
    its bytes are read once, while they are sent, and the import is applied only after the
    final message, which goes once every file is checked; a damaged file fails it, changing nothing."""
    keep_freed_memory()          # each message sent reuses freed memory instead of faulting in fresh pages
    reader = ExportReader(args.path)
    if "sequence" in reader.manifest:          # a link of a checkpoint chain: ImportChain
        return import_sequenced(client, args, reader, read_ahead(reader.streamed(), depth=FILES_AHEAD))
    with Progress(f"import {args.table}", reader.rows, enabled=not args.quiet) as progress:

        def chunks() -> Iterator[ExportChunk]:
            for chunk in read_ahead(reader.streamed(), depth=FILES_AHEAD):
                yield chunk
                progress.update(len(chunk.ids), chunk_bytes(chunk))

        rows = client.import_chunks(args.table, chunks(), mode=args.mode, config=reader.table)
    print(f"imported {rows:,} rows into {args.table} ({args.mode})")
    return 0
