"""The cluster manifest of a shard: how ids map to shards, kept in `<data-dir>/cluster.json`.

The manifest lives beside the database, not inside it, so snapshots and restores
never change which shard a server is. It is written atomically (temporary file,
fsync, rename) and read at start, where `check_shard_index` refuses a data
directory that belongs to another shard (a StatefulSet pod on the wrong volume).
"""
from __future__ import annotations

import json
import os
import re
import threading
from typing import Any

from kvstore_proto.v1 import kvstore_pb2 as pb

from kvstore.errors import FailedPrecondition, InvalidArgument

from .rpc import StoreWork

MANIFEST_FILE = "cluster.json"
FORMAT_VERSION = 1
FUNCTIONS = ("hash", "block")
COMPARED = ("shards", "function", "block_size", "shard_index")   # what a client's view must match
_lock = threading.Lock()


def manifest_path(data_dir: str) -> str:
    return os.path.join(data_dir, MANIFEST_FILE)


def read_manifest(data_dir: str) -> dict[str, Any] | None:
    """The stored manifest, or None when this server belongs to no cluster yet."""
    try:
        with open(manifest_path(data_dir)) as file:
            return json.load(file)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"cluster manifest: cannot read {MANIFEST_FILE}: {exc}") from None


def write_manifest(data_dir: str, manifest: dict[str, Any]) -> None:
    os.makedirs(data_dir, exist_ok=True)
    path = manifest_path(data_dir)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        json.dump(manifest, file, indent=2, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def validate(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with defaults filled in; INVALID_ARGUMENT naming the bad field."""
    shards, index = manifest.get("shards", 0), manifest.get("shard_index", 0)
    if shards < 1:
        raise InvalidArgument(f"manifest.shards: must be at least 1, got {shards}")
    if not 0 <= index < shards:
        raise InvalidArgument(f"manifest.shard_index: must be in [0, {shards}), got {index}")
    if manifest.get("function") not in FUNCTIONS:
        raise InvalidArgument(f"manifest.function: must be one of {list(FUNCTIONS)}, got {manifest.get('function')!r}")
    if manifest["function"] == "block" and manifest.get("block_size", 0) < 1:
        raise InvalidArgument(f"manifest.block_size: must be at least 1 for function block, "
                              f"got {manifest.get('block_size', 0)}")
    if not manifest.get("cluster_id"):
        raise InvalidArgument("manifest.cluster_id: must not be empty")
    return {**manifest, "format_version": FORMAT_VERSION}


def differences(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Each field in which a client's view differs from the stored manifest, as 'field: server X, client Y'."""
    return [f"{field}: server {stored.get(field)!r}, client {expected.get(field)!r}"
            for field in COMPARED if stored.get(field) != expected.get(field)]


def shard_index_of(name: str) -> int:
    """A shard index from `--shard-index`: a number, or a StatefulSet pod name ending in -<ordinal>."""
    match = re.fullmatch(r"(?:.*-)?(\d+)", name.strip())
    if match is None:
        raise InvalidArgument(f"--shard-index: expected a number or a pod name like kvstore-3, got {name!r}")
    return int(match.group(1))


def check_shard_index(data_dir: str, index: int) -> None:
    """At start: the data directory must hold this shard's data (or belong to no cluster yet)."""
    stored = read_manifest(data_dir)
    if stored is not None and stored.get("shard_index") != index:
        raise FailedPrecondition(
            f"--shard-index: this server is shard {index} but {data_dir} holds shard {stored.get('shard_index')} "
            f"of cluster {stored.get('cluster_id')} ({stored.get('shards')} shards); mount that shard's volume")


def _to_dict(message: pb.ClusterManifest) -> dict[str, Any]:
    return {"cluster_id": message.cluster_id, "shards": message.shards, "function": message.function,
            "block_size": message.block_size, "shard_index": message.shard_index}


def _to_proto(manifest: dict[str, Any]) -> pb.ClusterManifest:
    return pb.ClusterManifest(**{k: manifest[k] for k in (*COMPARED, "cluster_id", "format_version")
                                 if k in manifest})


class ClusterRPCs:
    """GetClusterManifest, SetClusterManifest (a mixin of the servicer; needs `config.data_dir`).
    The manifest file is read and written in the store's executor, never on the event loop."""

    work: StoreWork

    async def GetClusterManifest(self, request, context):
        stored = await self.work(read_manifest, self.config.data_dir)
        if stored is None:
            return pb.GetClusterManifestResponse(present=False)
        if request.HasField("expected"):
            found = differences(stored, _to_dict(request.expected))
            if found:
                raise FailedPrecondition(f"cluster manifest: the client's view differs from shard "
                                         f"{stored.get('shard_index')}'s: " + "; ".join(found))
        return pb.GetClusterManifestResponse(present=True, manifest=_to_proto(stored))

    async def SetClusterManifest(self, request, context):
        manifest = validate(_to_dict(request.manifest))
        await self.work(_store_manifest, self.config.data_dir, manifest, request.replace)
        return pb.SetClusterManifestResponse(manifest=_to_proto(manifest))


def _store_manifest(data_dir: str, manifest: dict[str, Any], replace: bool) -> None:
    """Write `manifest` unless the shard already belongs to another cluster (and not `replace`)."""
    with _lock:
        stored = read_manifest(data_dir)
        if stored is not None and not replace:
            found = differences(stored, manifest)
            if stored.get("cluster_id") != manifest["cluster_id"]:
                found.append(f"cluster_id: server {stored.get('cluster_id')!r}, client {manifest['cluster_id']!r}")
            if found:
                raise FailedPrecondition("cluster manifest: this shard already belongs to a cluster; "
                                         "set replace to overwrite: " + "; ".join(found))
        write_manifest(data_dir, manifest)
