"""The manifest check a ShardedClient makes before its first call.

Every shard stores the cluster manifest (shard count, function, block size,
its own index, the cluster id). A client's view must match each shard's: a
wrong shard count, function, block size or address order would send ids to
shards that do not own them, so it is FAILED_PRECONDITION naming the shard and
each difference. A brand-new cluster (no shard has a manifest, no shard holds a
table) gets one written by the first client. A shard without a manifest beside
shards that have one is refused unless the caller adopts it: it may be a lost
shard's empty replacement, which would silently serve fresh rows.
"""
from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from kvstore_proto.v1 import kvstore_pb2 as pb

from .errors import FailedPreconditionError
from .errors import rpc_errors as _rpc

if TYPE_CHECKING:
    from .sharding import ShardedClient


def read_manifests(client: ShardedClient, check: bool = True) -> dict[int, dict | None]:
    """Each shard's stored manifest (None where there is none); with `check`, a shard whose manifest
    differs from the client's view raises FAILED_PRECONDITION naming it and the difference."""

    def get(index: int) -> dict | None:
        expected = pb.ClusterManifest(**client.shard_map.manifest(index, "")) if check else None
        with _rpc():
            response = client.shards[index]._stub.GetClusterManifest(
                pb.GetClusterManifestRequest(expected=expected), timeout=client.timeout)
        if not response.present:
            return None
        m = response.manifest
        return {"cluster_id": m.cluster_id, "shards": m.shards, "function": m.function,
                "block_size": m.block_size, "shard_index": m.shard_index}

    return client.fan.each(get)


def write_manifests(client: ShardedClient, cluster_id: str, shards: list[int], replace: bool = False) -> None:
    def put(index: int) -> None:
        request = pb.SetClusterManifestRequest(
            manifest=pb.ClusterManifest(**client.shard_map.manifest(index, cluster_id)), replace=replace)
        with _rpc():
            client.shards[index]._stub.SetClusterManifest(request, timeout=client.timeout)

    client.fan.each(put, shards)


def join_cluster(client: ShardedClient, adopt_shards: bool = False) -> str:
    """Check every shard's manifest against the client's view; returns the cluster id."""
    manifests = read_manifests(client)
    ids = {m["cluster_id"] for m in manifests.values() if m is not None}
    if len(ids) > 1:
        owners = ", ".join(f"shard {i}: {m['cluster_id']}" for i, m in manifests.items() if m is not None)
        raise FailedPreconditionError(message=f"cluster manifest: the shards belong to different clusters ({owners})")
    missing = [i for i, m in manifests.items() if m is None]
    if not missing:
        return ids.pop()
    where = ", ".join(f"shard {i} ({client.addresses[i]})" for i in missing)
    if ids and not adopt_shards:
        raise FailedPreconditionError(
            message=f"cluster manifest: {where} has none while the other shards belong to cluster {next(iter(ids))}; "
                    "if it replaces a lost shard, restore its data first (or pass adopt_shards=True to accept it "
                    "as it is)")
    if not ids and len(client.shards) > 1 and not adopt_shards:
        holding = [i for i, names in client.fan.each(lambda i: client.shards[i].list_tables()).items() if names]
        if holding:
            raise FailedPreconditionError(
                message=f"cluster manifest: shard {holding[0]} ({client.addresses[holding[0]]}) holds tables but "
                        "no shard has a manifest: its rows were not placed by this shard map; move them with "
                        "`kvstore reshard` (or pass adopt_shards=True)")
    if ids:
        cluster_id = ids.pop()
    else:
        # Shard 0 arbitrates between clients initializing a new cluster at once: the first write there wins
        # (the server refuses a second, different cluster id) and the others take its id.
        cluster_id = uuid.uuid4().hex
        try:
            write_manifests(client, cluster_id, [0])
        except FailedPreconditionError:
            cluster_id = read_manifests(client)[0]["cluster_id"]
        missing = missing[1:]
    write_manifests(client, cluster_id, missing)
    return cluster_id
