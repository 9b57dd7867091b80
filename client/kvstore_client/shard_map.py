"""Which shard owns an id: a stable function of the id and the shard count, nothing else.

- `hash` (default): shard = splitmix64(id) mod n, where, on the id's 64 bits as an
  unsigned integer and with arithmetic mod 2**64,
      z = id + 0x9E3779B97F4A7C15
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
      z = (z ^ (z >> 27)) * 0x94D049BB133111EB
      splitmix64(id) = z ^ (z >> 31)
  Sequential, strided and skewed ids spread evenly; any language can compute it.
- `block`: shard = floor(id / block_size) mod n (Python's floor division, so
  negative ids work too): runs of block_size consecutive ids stay on one shard.

The map (shard count, function, block size) and each shard's index are the
cluster manifest that every shard stores; the address order of a client is the
shard order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError

FUNCTIONS = ("hash", "block")
DEFAULT_PORT = 50051
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(ids: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer of (id + golden ratio), on the ids' bits as uint64."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.int64, copy=False).view(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class ShardMap:
    """Ids to shard indices for `shards` shards."""

    shards: int
    function: str = "hash"
    block_size: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or self.shards < 1:
            raise InvalidArgumentError(message=f"shards: must be a positive integer, got {self.shards!r}")
        if self.function not in FUNCTIONS:
            raise InvalidArgumentError(message=f"function: must be one of {list(FUNCTIONS)}, got {self.function!r}")
        if self.function == "block" and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise InvalidArgumentError(message=f"block_size: must be a positive integer for function block, "
                                               f"got {self.block_size!r}")
        if self.function == "hash" and self.block_size:
            raise InvalidArgumentError(message="block_size: only used by function block; leave it 0 for hash")

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        """The shard index (int64) of every id."""
        if self.function == "hash":
            return (splitmix64(ids) % np.uint64(self.shards)).astype(np.int64)
        return (ids.astype(np.int64, copy=False) // self.block_size) % self.shards

    def split(self, ids: np.ndarray) -> list[np.ndarray]:
        """For each shard, the positions in `ids` of its ids, in request order."""
        if self.shards == 1:
            return [np.arange(len(ids))]
        owner = self.shard_of(ids)
        if self.shards <= 1 << 16:                       # a stable sort of 16-bit keys is a radix sort: O(n)
            owner = owner.astype(np.uint16)
        order = np.argsort(owner, kind="stable")
        bounds = np.zeros(self.shards + 1, np.int64)
        np.cumsum(np.bincount(owner, minlength=self.shards), out=bounds[1:])
        return [order[bounds[i]:bounds[i + 1]] for i in range(self.shards)]

    def manifest(self, shard_index: int, cluster_id: str) -> dict:
        return {"cluster_id": cluster_id, "shards": self.shards, "function": self.function,
                "block_size": self.block_size, "shard_index": shard_index}


def statefulset_addresses(service: str, replicas: int, statefulset: str | None = None) -> list[str]:
    """The shard list of a StatefulSet behind a headless Service, in ordinal order:
    `kvstore.ns.svc.cluster.local:50051` with 3 replicas -> `kvstore-0.kvstore.ns.svc.cluster.local:50051`, ...
    The pods are named after the StatefulSet (`statefulset`, by default the Service's own name)."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InvalidArgumentError(message=f"replicas: must be a positive integer, got {replicas!r}")
    host, _, port = service.rpartition(":") if ":" in service else (service, "", str(DEFAULT_PORT))
    if not host or not port.isdigit():
        raise InvalidArgumentError(message=f"address: expected a Service DNS name with a port, got {service!r}")
    name = statefulset or host.split(".", 1)[0]
    return [f"{name}-{i}.{host}:{port}" for i in range(replicas)]


def shard_addresses(address: str | list[str] | tuple[str, ...], replicas: int | None = None) -> list[str]:
    """The ordered shard list of a client: a list, a comma-separated string, or a Service name with `replicas`."""
    if isinstance(address, str):
        if replicas is not None:
            return statefulset_addresses(address, replicas)
        addresses = [part.strip() for part in address.split(",")]
    else:
        if replicas is not None:
            raise InvalidArgumentError(message="replicas: only with a headless Service's DNS name, not a list")
        addresses = list(address)
    if not addresses or not all(isinstance(a, str) and a for a in addresses):
        raise InvalidArgumentError(message=f"address: expected non-empty host:port strings, got {address!r}")
    if len(set(addresses)) != len(addresses):
        raise InvalidArgumentError(message=f"address: a shard appears twice in {addresses}")
    return addresses
