"""The same-host doorbell's framing: SharedLookup calls over a Unix socket, beside gRPC.

A gRPC call costs a server about 0.7 ms of CPU on a 16-core host whatever it carries (most of
it inside grpcio), half of a same-host lookup of 4,096 rows. A client on the server's machine
may instead send its SharedLookup calls over a Unix socket (the name AttachSegment answers
with, in Linux's abstract namespace), read by a thread the server gives each connection. The
call's meaning, checks and answer are SharedLookup's exactly; only the headers travel differently.

Every frame is a 5-byte header (payload length, little-endian uint32; a kind byte) and a payload:
- client: HELLO once per connection (payload: the bearer token, empty without one), then one
  SHARED_LOOKUP frame per call (payload: a serialized SharedLookupRequest), each waiting for its
  answer;
- server: one answer per frame, whose kind is the gRPC status code's value (0: OK) and whose
  payload is the serialized SharedLookupResponse when OK, else the error's reason and message,
  UTF-8, joined by a newline.
"""
from __future__ import annotations

import struct

HEADER = struct.Struct("<IB")
MAX_PAYLOAD = 1 << 16          # far more than a SharedLookupRequest or an answer needs
HELLO, SHARED_LOOKUP = 0, 1


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), kind) + payload


def error_payload(reason: str, message: str) -> bytes:
    return f"{reason}\n{message}".encode()


def parse_error(payload: bytes) -> tuple[str, str]:
    """(reason, message) of an error answer's payload."""
    reason, _, message = payload.decode("utf-8", "replace").partition("\n")
    return reason, message
