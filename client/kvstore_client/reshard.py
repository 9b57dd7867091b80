"""`kvstore reshard TABLE --to M --target ADDRESSES`: move a table from n shards to m, offline.

The table streams from every source shard (export) into the target cluster
(import, each row to the shard the target's map gives it), then the target is
read back and checked: the row count and an order-independent checksum of
every row (id, weights, optimizer state, metadata) must equal the source's, and
every row must sit on the shard that owns it. The source is only read, so a
failed or interrupted reshard loses nothing: fix the cause and run it again
(the target table is replaced). Stop writers to the table first: rows written
to the source during the move may or may not be moved.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
from kvstore_proto.export_format import ExportChunk

from .errors import FailedPreconditionError, InvalidArgumentError
from .progress import Progress
from .shard_map import ShardMap, splitmix64, statefulset_addresses


@dataclass
class RowDigest:
    """Row count and checksum of a set of rows: the checksum is the sum (mod 2**64) of one 64-bit
    hash per row, so it does not depend on the order or the chunking of the rows."""

    rows: int = 0
    checksum: int = 0

    def add(self, chunk: ExportChunk) -> None:
        self.rows += len(chunk.ids)
        self.checksum = (self.checksum + int(row_hashes(chunk).sum(dtype=np.uint64))) % (1 << 64)


def row_hashes(chunk: ExportChunk) -> np.ndarray:
    """One splitmix64 chain per row over its bytes: id, weights, state, meta (zero-padded to 8-byte words)."""
    n = len(chunk.ids)
    fields = [np.ascontiguousarray(a).reshape(n, -1).view(np.uint8)
              for a in (chunk.ids.astype("<i8"), chunk.weights, chunk.state.astype("<f4"),
                        chunk.meta.astype("<u4"))]
    row = np.concatenate(fields, axis=1)
    row = np.pad(row, ((0, 0), (0, -row.shape[1] % 8)))
    words = np.ascontiguousarray(row).view("<u8")
    digest = splitmix64(words[:, 0].view(np.int64))
    for column in range(1, words.shape[1]):
        digest = splitmix64((digest ^ words[:, column]).view(np.int64))
    return digest


def source_shards(client) -> list:
    return list(getattr(client, "shards", [client]))


def reshard(source, target, table: str, progress: bool = True) -> RowDigest:
    """Move `table` from `source` (a KVStoreClient or ShardedClient) into the `target` cluster and verify it.
    Returns the digest that both sides matched; FAILED_PRECONDITION when they differ."""
    if getattr(source, "cluster_id", None) and source.cluster_id == target.cluster_id:
        raise FailedPreconditionError(message=f"target: it is the source cluster ({target.cluster_id}); "
                                              "reshard into a new set of servers")
    streams = [shard.export(table) for shard in source_shards(source)]
    config = {k: v for k, v in streams[0].config.items() if k != "name"}
    moved = RowDigest()
    bar = Progress(f"reshard {table}", sum(s.estimated_rows for s in streams), enabled=progress)

    def chunks():
        for stream in streams:
            for chunk in stream:
                moved.add(chunk)
                bar.update(len(chunk.ids))
                yield chunk

    try:
        imported = target.import_chunks(table, chunks(), mode="replace", config=config)
    finally:
        for stream in streams:
            stream.cancel()
    bar.done()
    landed = verify_placement(target, table, progress)
    if (imported, landed.rows, landed.checksum) != (moved.rows, moved.rows, moved.checksum):
        raise FailedPreconditionError(
            message=f"reshard {table}: verification failed: source {moved.rows} rows (checksum {moved.checksum:016x}), "
                    f"imported {imported}, target holds {landed.rows} rows (checksum {landed.checksum:016x})")
    return moved


def verify_placement(target, table: str, progress: bool = True) -> RowDigest:
    """Read the table back from every target shard: its digest, and a check that each row is on its shard."""
    digest = RowDigest()
    shards = source_shards(target)
    shard_map = getattr(target, "shard_map", ShardMap(1))
    streams = [shard.export(table) for shard in shards]
    bar = Progress(f"verify {table}", sum(s.estimated_rows for s in streams), enabled=progress)
    for index, stream in enumerate(streams):
        for chunk in stream:
            misplaced = np.flatnonzero(shard_map.shard_of(chunk.ids) != index)
            if len(misplaced):
                raise FailedPreconditionError(message=f"reshard {table}: shard {index} holds id "
                                                      f"{chunk.ids[misplaced[0]]}, which belongs to another shard")
            digest.add(chunk)
            bar.update(len(chunk.ids))
    bar.done()
    return digest


def add_reshard_command(commands) -> None:
    """Registers `kvstore reshard` on the CLI's subparsers."""
    parser = commands.add_parser("reshard", help="move a table to a cluster of M shards (offline; docs/scale-out.md)")
    parser.add_argument("table")
    parser.add_argument("--to", type=int, required=True, metavar="M", help="shard count of the target cluster")
    parser.add_argument("--target", required=True,
                        help="the target's shards in order (comma-separated host:port), or one headless "
                             "Service host:port whose StatefulSet has M replicas")
    parser.add_argument("--function", choices=("hash", "block"), default="hash", help="the target's shard map")
    parser.add_argument("--block-size", type=int, default=0, help="ids per block (function block)")
    parser.set_defaults(func=reshard_command)


def reshard_command(client, args: argparse.Namespace) -> None:
    """`client` is the source (`--address`: one server or a comma-separated shard list)."""
    from .cli import connect
    from .sharding import ShardedClient

    addresses = args.target.split(",")
    if len(addresses) == 1 and args.to > 1:
        addresses = statefulset_addresses(args.target, args.to)
    if len(addresses) != args.to:
        raise InvalidArgumentError(message=f"--target: {len(addresses)} addresses for --to {args.to} shards")
    shards = [connect(argparse.Namespace(**{**vars(args), "address": address})) for address in addresses]
    with ShardedClient(addresses, args.timeout, function=args.function, block_size=args.block_size,
                       clients=shards) as target:
        digest = reshard(client, target, args.table, progress=not args.quiet)
    print(f"resharded {args.table}: {digest.rows:,} rows onto {args.to} shards, checksum {digest.checksum:016x} "
          "verified")
