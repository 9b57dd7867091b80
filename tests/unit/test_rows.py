"""The stored row layout: bytes in RocksDB round-trip exactly; bad sizes are storage errors."""
from __future__ import annotations

import numpy as np
import pytest

from kvstore import StorageError, TableConfig
from kvstore.rows import RowLayout, decode_keys, encode_keys


def test_rows_round_trip_through_values_keeping_zero_bytes():
    layout = RowLayout.of(TableConfig(name="t", dim=5))
    rows = np.zeros((4, layout.row_bytes), dtype=np.uint8)
    rows[1, -1] = 7
    rows[2, 0] = 255
    values = layout.to_values(rows[::1])
    assert [len(v) for v in values] == [layout.row_bytes] * 4
    back = layout.from_values(values)
    np.testing.assert_array_equal(back, rows)
    back[0, 0] = 1                                   # a writable array of its own
    assert layout.to_values(rows[:0]) == [] and layout.from_values([]).shape == (0, layout.row_bytes)


def test_stored_row_of_the_wrong_size_is_a_storage_error():
    layout = RowLayout.of(TableConfig(name="t", dim=5))
    with pytest.raises(StorageError, match="size"):
        layout.from_values([bytes(layout.row_bytes), bytes(layout.row_bytes - 1)])


def test_keys_are_eight_bytes_with_trailing_zero_bytes_kept():
    ids = np.array([0, 256, -(1 << 63), 1 << 40], dtype=np.int64)
    keys = encode_keys(ids)
    assert keys[0] == b"\x80" + bytes(7)
    assert keys[2] == bytes(8)
    assert all(len(k) == 8 for k in keys)
    np.testing.assert_array_equal(decode_keys(keys), ids)
    assert encode_keys(np.zeros(0, dtype=np.int64)) == []
