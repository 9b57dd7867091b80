"""kvstore: an SSD-backed embedding store (cache tier over RocksDB)."""
from .config import (
    CacheConfig,
    EvictionConfig,
    InitializerConfig,
    OptimizerConfig,
    RocksConfig,
    SweeperConfig,
    TableConfig,
)
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KVStoreError,
    NotFound,
    ResourceExhausted,
    RowNotFound,
    StorageError,
    StorageFault,
    StoreClosed,
    TableExists,
    TableNotFound,
    Unavailable,
)
from .store import Store
from .table import LookupResult, Table

__all__ = [
    "AlreadyExists",
    "CacheConfig",
    "EvictionConfig",
    "FailedPrecondition",
    "InitializerConfig",
    "InvalidArgument",
    "KVStoreError",
    "LookupResult",
    "NotFound",
    "OptimizerConfig",
    "ResourceExhausted",
    "RocksConfig",
    "RowNotFound",
    "StorageError",
    "StorageFault",
    "Store",
    "StoreClosed",
    "SweeperConfig",
    "Table",
    "TableConfig",
    "TableExists",
    "TableNotFound",
    "Unavailable",
]
