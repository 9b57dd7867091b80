"""The client's exceptions: one class per gRPC status code, built from grpc.RpcError.

Match on the class (or `code`), never on message text. `reason` is the
server's stable reason code (trailing metadata `kvstore-reason`), e.g.
"table_not_found" versus "row_not_found", both NotFoundError.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

REASON_KEY = "kvstore-reason"


class KVStoreError(Exception):
    """Base of every error the client raises; `code` is a grpc.StatusCode."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, code: grpc.StatusCode | None = None, message: str = "", reason: str = ""):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name


class InvalidArgumentError(KVStoreError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(KVStoreError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(KVStoreError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhaustedError(KVStoreError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(KVStoreError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnauthenticatedError(KVStoreError):
    code = grpc.StatusCode.UNAUTHENTICATED


class UnavailableError(KVStoreError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(KVStoreError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(KVStoreError):
    code = grpc.StatusCode.INTERNAL


class DataLossError(KVStoreError):
    """Data read by the client (an export's files) is damaged; the message names the file."""
    code = grpc.StatusCode.DATA_LOSS


BY_CODE: dict[grpc.StatusCode, type[KVStoreError]] = {
    kind.code: kind
    for kind in (
        InvalidArgumentError, NotFoundError, AlreadyExistsError, ResourceExhaustedError,
        FailedPreconditionError, UnauthenticatedError, UnavailableError, DeadlineExceededError,
        InternalError, DataLossError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> KVStoreError:
    """The client exception for a failed call (KVStoreError itself for codes without a class)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    reason = ""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == REASON_KEY:
            reason = value if isinstance(value, str) else value.decode()
    return BY_CODE.get(code, KVStoreError)(code, message or "", reason)


@contextmanager
def rpc_errors() -> Iterator[None]:
    """grpc.RpcError raised inside -> the matching KVStoreError subclass."""
    try:
        yield
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None
