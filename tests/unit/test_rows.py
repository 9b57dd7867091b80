"""The stored row layout: bytes in RocksDB round-trip exactly; bad sizes are storage errors."""
from __future__ import annotations

import numpy as np
import pytest

from kvstore import OptimizerConfig, StorageError, TableConfig
from kvstore.rows import MAX_PADDING, RowLayout, decode_keys, encode_keys, slab_pitch


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


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad", "adam", "partial_rowwise_adam"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_gpu_slab_pitch_pads_no_row_by_more_than_a_sixteenth(optimizer, dtype):
    for dim in (1, 4, 8, 16, 32, 37, 64, 100, 128, 200, 256, 512):
        config = TableConfig(name="t", dim=dim, dtype=dtype, optimizer=OptimizerConfig(name=optimizer))
        row_bytes = RowLayout.of(config).row_bytes
        pitch = slab_pitch(row_bytes)
        assert row_bytes <= pitch <= row_bytes * (1 + MAX_PADDING) and pitch % 16 == 0, (dim, row_bytes, pitch)


@pytest.mark.parametrize(("dim", "optimizer", "row_bytes", "pitch"), [
    (128, "rowwise_adagrad", 544, 576),     # 64-byte rows: 32 bytes more, under 1/16
    (128, "sgd", 528, 544),                 # to 64 would add 48 (over 1/16): 32-byte rows
    (64, "sgd", 272, 288),
    (16, "sgd", 80, 80),                    # any rounding would add over 1/16
    (256, "adam", 3088, 3136),
])
def test_gpu_slab_rows_start_on_the_widest_boundary_that_costs_at_most_a_sixteenth(dim, optimizer, row_bytes,
                                                                                  pitch):
    layout = RowLayout.of(TableConfig(name="t", dim=dim, optimizer=OptimizerConfig(name=optimizer)))
    assert (layout.row_bytes, slab_pitch(layout.row_bytes)) == (row_bytes, pitch)
    assert slab_pitch(layout.row_bytes, align=16) == row_bytes
