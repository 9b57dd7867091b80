"""Structured logs: text or JSON lines, with the request id of the RPC that logged them.

Every RPC gets a request id: the caller's `x-request-id` metadata when given
(so a client can trace one call across shards), otherwise a fresh one. It is
returned in the response's initial metadata and added to every log record
written while the call runs, and each call ends with one access record
(DEBUG when it succeeded, INFO otherwise).
"""
from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import time
import uuid

import grpc

REQUEST_ID_METADATA = "x-request-id"
_REQUEST_ID = contextvars.ContextVar("kvstore_request_id", default="")
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
ACCESS_FIELDS = ("method", "code", "duration_ms", "peer")
log = logging.getLogger("kvstore_server.access")


def current_request_id() -> str:
    return _REQUEST_ID.get()


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = _REQUEST_ID.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and access fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        entry.update({key: getattr(record, key) for key in ACCESS_FIELDS if hasattr(record, key)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(log_format: str = "text", level: str = "info") -> None:
    """Route every logger to stderr in `log_format` (text | json) at `level`."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def begin_call(context: grpc.aio.ServicerContext) -> asyncio.Future:
    """Give the call its request id (the caller's `x-request-id` when valid) and start sending it back
    in the initial metadata; await the returned future before the first response goes out."""
    given = next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID_METADATA), "")
    request_id = given if isinstance(given, str) and _VALID_ID.fullmatch(given) else uuid.uuid4().hex
    _REQUEST_ID.set(request_id)     # each call runs in its own task: the variable is the call's
    sending = asyncio.ensure_future(context.send_initial_metadata(((REQUEST_ID_METADATA, request_id),)))
    sending.add_done_callback(lambda done: done.cancelled() or done.exception())   # a gone client: no warning
    return sending


def end_call(peer: str, method: str, code: grpc.StatusCode, seconds: float) -> None:
    """The call's one access record: DEBUG when it succeeded, INFO otherwise. `peer` is read when the call
    begins: the context of a cancelled call must not be asked (grpcio's aio server crashes on `peer()`)."""
    level = logging.DEBUG if code is grpc.StatusCode.OK else logging.INFO
    if not log.isEnabledFor(level):                     # most calls, at the default level: nothing to build
        return
    fields = {"method": method, "code": code.name, "duration_ms": round(seconds * 1000, 3), "peer": peer}
    log.log(level, "%s %s %.3fms", method, code.name, fields["duration_ms"], extra=fields)
