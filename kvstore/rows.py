"""Byte layout of a stored row, identical in the host cache's slab and in RocksDB.

    header (16 B) | weights (dim x dtype, padded to 16 B) | state (state_dim x float32, padded)

Because the host slab holds rows in this exact layout, writing back a dirty
row or loading a missed one is a plain copy of bytes, with no re-encoding. The
GPU slab holds the same bytes rotated, header last (kvstore/gpu_cache.py): its
copies in and out move the two pieces.
Keys are 8-byte big-endian with the sign bit flipped, so RocksDB's byte order
is numeric order.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .config import TableConfig
from .dtypes import weight_dtype

FORMAT_VERSION = 1
HEADER = np.dtype(
    [
        ("version", "<u1"),
        ("flags", "<u1"),
        ("score", "<u2"),        # client-supplied feature score, bfloat16 bits (see `encode_scores`)
        ("count", "<u4"),        # accesses since the row was created (for LFU / decay)
        ("last_access", "<u4"),  # unix seconds of the last access (for TTL)
        ("step", "<u4"),         # optimizer steps applied to the row (Adam bias correction)
    ]
)
HEADER_BYTES = HEADER.itemsize
MAX_COUNT = np.uint32(2**32 - 2)
_SIGN = np.uint64(1 << 63)


ROW_ALIGN = 64            # bytes: where a GPU slab's rows start, where padding costs little
MAX_PADDING = 1 / 16      # of a row: the most memory that alignment may add


def slab_pitch(row_bytes: int, align: int | None = None) -> int:
    """Bytes from one row's start to the next in a GPU slab (kvstore/gpu_cache.py, where rows lead
    with their weights): `row_bytes` rounded up to `align`, by default to the largest of
    ROW_ALIGN, 32 and 16 bytes that pads a row by at most MAX_PADDING."""
    if align is None:
        align = next(a for a in (ROW_ALIGN, 32, 16) if -row_bytes % a <= row_bytes * MAX_PADDING)
    return row_bytes + -row_bytes % align


def _pad16(n: int) -> int:
    return (n + 15) // 16 * 16


@dataclass(frozen=True)
class RowLayout:
    dim: int
    dtype: np.dtype
    state_dim: int

    @classmethod
    def of(cls, config: TableConfig) -> RowLayout:
        return cls(config.dim, weight_dtype(config.dtype), config.state_dim)

    @property
    def weight_offset(self) -> int:
        return HEADER_BYTES

    @property
    def state_offset(self) -> int:
        return HEADER_BYTES + _pad16(self.dim * self.dtype.itemsize)

    @property
    def row_bytes(self) -> int:
        return self.state_offset + _pad16(self.state_dim * 4)

    def header(self, rows: np.ndarray) -> np.ndarray:
        """[n] structured view of the headers of a [n, row_bytes] uint8 array."""
        return rows[:, :HEADER_BYTES].view(HEADER)[:, 0]

    def weights(self, rows: np.ndarray) -> np.ndarray:
        """[n, dim] view of the weights of a [n, row_bytes] uint8 array."""
        end = self.weight_offset + self.dim * self.dtype.itemsize
        return rows[:, self.weight_offset:end].view(self.dtype)

    def state(self, rows: np.ndarray) -> np.ndarray:
        """[n, state_dim] float32 view of the optimizer state."""
        end = self.state_offset + self.state_dim * 4
        return rows[:, self.state_offset:end].view(np.float32)

    def empty(self, n: int) -> np.ndarray:
        rows = np.zeros((n, self.row_bytes), dtype=np.uint8)
        self.header(rows)["version"] = FORMAT_VERSION
        return rows

    def from_values(self, values: list[bytes]) -> np.ndarray:
        """Rows read from RocksDB (all present) into one [n, row_bytes] array."""
        # bytearray.join: one copy into a writable buffer (bytes.join and .copy() cost ~30x more)
        flat = np.frombuffer(bytearray().join(values), dtype=np.uint8)
        if flat.size != len(values) * self.row_bytes:
            from .errors import StorageError

            raise StorageError(
                f"stored rows have an unexpected size (expected {self.row_bytes} bytes each)"
            )
        return flat.reshape(len(values), self.row_bytes)

    def to_values(self, rows: np.ndarray) -> list[bytes]:
        # a void view's tolist() makes one bytes object per row in C, keeping zero bytes
        return row_records(rows).tolist()


def row_records(rows: np.ndarray) -> np.ndarray:
    """[n] void records over [n, k] rows of bytes, one record per row (a copy only when the rows
    are not contiguous): a gather or scatter of records moves each row as one block, several
    times faster than fancy indexing of a uint8 matrix."""
    rows = np.ascontiguousarray(rows)
    return rows.view(f"V{rows.shape[1]}").reshape(-1)


def encode_scores(scores: np.ndarray) -> np.ndarray:
    """float scores -> bfloat16 bits for the header's 2-byte score field.

    bfloat16 keeps float32's range with 3 significant digits: enough to rank
    rows for eviction, which is all scores are used for."""
    return np.asarray(scores, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def decode_scores(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)


def encode_keys(ids: np.ndarray) -> list[bytes]:
    """int64 ids -> 8-byte big-endian keys with the sign bit flipped (numeric order)."""
    flipped = (ids.astype(np.int64, copy=False).view(np.uint64) ^ _SIGN).astype(">u8")
    return flipped.view("V8").tolist()     # one bytes object per key, trailing zero bytes kept


def decode_keys(keys: list[bytes]) -> np.ndarray:
    flat = np.frombuffer(b"".join(keys), dtype=">u8").astype(np.uint64)
    return (flat ^ _SIGN).view(np.int64)
