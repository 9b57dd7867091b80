"""ApplyGradients requests written as wire bytes: the rows are copied once, by the join.

Building a `pb.ApplyGradientsRequest` copies a chunk's gradients three times
(`tobytes`, the message field, `SerializeToString`), all while holding the GIL;
a sharded client pushing 65,536 rows of dim 128 spent most of its step there.
Here a chunk is its fields' headers plus views of the gathered ids and rows
(`tensors.message_parts`), joined once when gRPC serializes it. The bytes are exactly a valid
`ApplyGradientsRequest` (tests/unit/test_gradient_messages.py parses them back).
"""
from __future__ import annotations

import numpy as np
from kvstore_proto.tensors import WireError, _varint, message_parts, wire_name

from .errors import InvalidArgumentError

_LAST = b"\xa8\x01\x01"            # field 21 (`last`), varint 1: appended, as a serializer would write it


class GradientChunk:
    """One message of an ApplyGradients stream; `streamed_write` sets `last` on the final one."""

    __slots__ = ("parts", "last")

    def __init__(self, table: str, ids: np.ndarray, grads: np.ndarray, owner: str, key: str,
                 scores: np.ndarray | None = None):
        self.last = False
        _check_dtype(grads, "grads")
        if scores is not None:
            _check_dtype(scores, "scores")
        self.parts: list = message_parts({3: grads, 5: scores}, {2: ids}, _string(1, table))
        self.parts.append(_string(4, owner) + _string(20, key))

    def serialize(self) -> bytes:
        return b"".join(self.parts + [_LAST] if self.last else self.parts)


def serialize(chunk: GradientChunk) -> bytes:
    """The request serializer of the ApplyGradients method that sends GradientChunks."""
    return chunk.serialize()


def _check_dtype(array: np.ndarray, field: str) -> None:
    try:
        wire_name(np.asarray(array).dtype, field)
    except WireError as exc:
        raise InvalidArgumentError(message=str(exc)) from None


def _string(number: int, text: str) -> bytes:
    """String field `number` (nothing for an empty string, as a serializer writes it)."""
    data = text.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data if data else b""
