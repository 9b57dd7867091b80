"""kvstore thin client: grpc + protobuf + NumPy; torch only when the caller passes torch tensors."""
from .client import KVStoreClient
from .errors import (
    AlreadyExistsError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    KVStoreError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from .sharding import ShardedClient

__all__ = [
    "AlreadyExistsError", "DeadlineExceededError", "FailedPreconditionError", "InternalError", "DataLossError",
    "InvalidArgumentError", "KVStoreError", "KVStoreClient", "NotFoundError", "ResourceExhaustedError",
    "ShardedClient", "UnauthenticatedError", "UnavailableError",
]
