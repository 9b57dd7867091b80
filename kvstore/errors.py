"""One error hierarchy for the store.

Every error carries a stable `reason` code; the server maps classes to gRPC
status codes in one table, and clients match on codes, never on message text.
Messages name the offending field.
"""
from __future__ import annotations


class KVStoreError(Exception):
    """Base of every error the store raises on purpose."""

    reason = "internal"


class InvalidArgument(KVStoreError):
    reason = "invalid_argument"


class NotFound(KVStoreError):
    reason = "not_found"


class TableNotFound(NotFound):
    reason = "table_not_found"


class RowNotFound(NotFound):
    reason = "row_not_found"


class AlreadyExists(KVStoreError):
    reason = "already_exists"


class TableExists(AlreadyExists):
    reason = "table_exists"


class ResourceExhausted(KVStoreError):
    reason = "resource_exhausted"


class FailedPrecondition(KVStoreError):
    reason = "failed_precondition"


class StoreClosed(FailedPrecondition):
    reason = "store_closed"


class StorageError(KVStoreError):
    """RocksDB failed (I/O error, full disk, corruption); wraps rocksdict's bare Exception."""

    reason = "storage_error"


class Unavailable(KVStoreError):
    """The store cannot serve this call now, but may soon: the client may retry with backoff."""

    reason = "unavailable"


class StorageFault(Unavailable):
    """Writes are refused while RocksDB refuses writes (a full disk); reads go on. The message
    names the cause in plain words, without paths or RocksDB internals."""

    reason = "storage_fault"
