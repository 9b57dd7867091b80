"""kvstore: an SSD-backed embedding store (cache tier over RocksDB)."""
from .config import CacheConfig, InitializerConfig, OptimizerConfig, RocksConfig, TableConfig
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KVStoreError,
    NotFound,
    ResourceExhausted,
    RowNotFound,
    StorageError,
    StoreClosed,
    TableExists,
    TableNotFound,
)
from .store import Store
from .table import LookupResult, Table

__all__ = [
    "AlreadyExists", "CacheConfig", "FailedPrecondition", "InitializerConfig", "InvalidArgument",
    "KVStoreError", "LookupResult", "NotFound", "OptimizerConfig", "ResourceExhausted", "RocksConfig",
    "RowNotFound", "StorageError", "Store", "StoreClosed", "Table", "TableConfig", "TableExists",
    "TableNotFound",
]
