"""The one table from store errors to status codes is complete, and the client mirrors the codes."""
from __future__ import annotations

import builtins
import inspect

import grpc
import kvstore_client
import pytest
from kvstore_client.errors import BY_CODE, KVStoreError
from kvstore_proto.tensors import WireError
from kvstore_server.errors import STATUS, status_of

from kvstore import errors as store_errors

STORE_ERRORS = [
    kind for _, kind in inspect.getmembers(store_errors, inspect.isclass)
    if issubclass(kind, store_errors.KVStoreError)
]


@pytest.mark.parametrize("kind", STORE_ERRORS, ids=lambda kind: kind.__name__)
def test_every_store_error_class_has_a_status_code(kind):
    assert kind in STATUS, f"{kind.__name__} is missing from kvstore_server.errors.STATUS"
    code, message, reason = status_of(kind("field: bad"))
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK)
    assert reason == kind.reason


def test_wire_errors_are_invalid_argument():
    assert status_of(WireError("ids: 3 bytes"))[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "ids: 3 bytes")


def test_unexpected_errors_are_internal_without_internals():
    code, message, reason = status_of(ZeroDivisionError("secret /path/to/file"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message and reason == "internal"
    code, message, _ = status_of(store_errors.StorageError("rocksdb write failed: IO error /data/db/000012.sst"))
    assert code == grpc.StatusCode.UNAVAILABLE and "/data" not in message and message.startswith("storage")


BRIEF_CODES = {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
               "UNAUTHENTICATED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"}


def test_client_has_one_exported_class_per_status_code():
    assert {code.name for code in BY_CODE} >= BRIEF_CODES
    for code, kind in BY_CODE.items():
        assert issubclass(kind, KVStoreError) and kind.code == code
        assert kind.__name__ in kvstore_client.__all__
        assert not hasattr(builtins, kind.__name__)


def test_every_server_code_has_a_client_class():
    assert set(STATUS.values()) <= set(BY_CODE)


def test_unreachable_server_is_unavailable():
    from .conftest import free_port

    with kvstore_client.KVStoreClient(f"127.0.0.1:{free_port()}", timeout=5) as client:
        with pytest.raises(kvstore_client.UnavailableError) as caught:
            client.list_tables()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_messages_are_bounded_and_long_values_shortened():
    from kvstore_server.errors import MAX_MESSAGE_CHARS

    code, message, _ = status_of(store_errors.InvalidArgument(f"name: {'a' * 8192!r} must match [A-Za-z0-9]"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message == "name: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa…(8192 chars)' must match [A-Za-z0-9]"
    _, message, _ = status_of(store_errors.InvalidArgument("ids: " + "é x " * 10_000))
    assert len(message) <= MAX_MESSAGE_CHARS and message.startswith("ids: é x")
