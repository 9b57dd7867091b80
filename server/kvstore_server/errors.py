"""One table from store errors to gRPC status codes, and the one place handlers abort.

Every error leaves through `abort`: the status code comes from `STATUS`, the
store's stable reason code travels in the trailing metadata `kvstore-reason`,
and the message is the store's (it names the offending field). Anything not
raised on purpose becomes INTERNAL with a generic message and is logged here,
so no client ever sees UNKNOWN or a server-side traceback.

StorageError -> UNAVAILABLE: RocksDB failed an I/O (full disk, device error),
which is a condition of the server's disk, not of the request; it clears once
the device recovers or the operator reopens the database, so a client may retry
with backoff or fail over to a replica. Its message carries rocksdict's text
(paths, internals), so the client gets a generic one and the server log the rest.
StoreClosed -> UNAVAILABLE as well: the server is shutting down.

Messages are bounded (`MAX_MESSAGE_CHARS`): a long value quoted in one (an 8 KB
table name) is shown shortened, e.g. 'aaaa…(8192 chars)', so the status text
stays far under gRPC's metadata limit and the code the client sees is the one
mapped here, never RESOURCE_EXHAUSTED for the size of the error text itself.
"""
from __future__ import annotations

import logging
import re

import grpc
from kvstore_proto.tensors import WireError

from kvstore import errors as store_errors

log = logging.getLogger("kvstore_server")

REASON_KEY = "kvstore-reason"

STATUS: dict[type[Exception], grpc.StatusCode] = {
    store_errors.KVStoreError: grpc.StatusCode.INTERNAL,
    store_errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    store_errors.NotFound: grpc.StatusCode.NOT_FOUND,
    store_errors.TableNotFound: grpc.StatusCode.NOT_FOUND,
    store_errors.RowNotFound: grpc.StatusCode.NOT_FOUND,
    store_errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    store_errors.TableExists: grpc.StatusCode.ALREADY_EXISTS,
    store_errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    store_errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    store_errors.StoreClosed: grpc.StatusCode.UNAVAILABLE,
    store_errors.StorageError: grpc.StatusCode.UNAVAILABLE,
    store_errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    store_errors.StorageFault: grpc.StatusCode.UNAVAILABLE,    # writes refused in a storage fault; plain words
    WireError: grpc.StatusCode.INVALID_ARGUMENT,
}
_STORAGE_MESSAGE = "storage: the RocksDB tier failed; see the server log"
_INTERNAL_MESSAGE = "internal error; see the server log"
MAX_MESSAGE_CHARS = 512     # percent-encoded, 512 characters of any script stay under 8 KiB
MAX_TOKEN_CHARS = 64        # a longer unbroken run (a name, a quoted value) is shortened
KEEP_CHARS = 32
_LONG_TOKEN = re.compile(r"[^\s,;:()\[\]{}'\"]{" + str(MAX_TOKEN_CHARS + 1) + ",}")


def bounded_message(message: str) -> str:
    """`message` with every long token shortened to its head and length, then cut to
    MAX_MESSAGE_CHARS: the field name that opens it always survives."""
    message = _LONG_TOKEN.sub(lambda m: f"{m.group()[:KEEP_CHARS]}…({len(m.group())} chars)", message)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - 1] + "…"
    return message


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(code, message, reason) for an exception raised by a handler."""
    code = next((STATUS[kind] for kind in type(exc).__mro__ if kind in STATUS), None)
    if code is None or type(exc) is store_errors.KVStoreError:
        log.error("unexpected error in a handler", exc_info=exc)
        return grpc.StatusCode.INTERNAL, _INTERNAL_MESSAGE, "internal"
    reason = getattr(exc, "reason", "invalid_argument")
    if isinstance(exc, store_errors.StorageError):
        log.error("storage error: %s", exc, exc_info=exc)
        return code, _STORAGE_MESSAGE, reason
    return code, bounded_message(str(exc)), reason


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str, reason: str) -> None:
    """End the call with `code`; the reason travels in trailing metadata. Raises, as context.abort does."""
    context.set_trailing_metadata(((REASON_KEY, reason),))
    context.abort(code, message)
