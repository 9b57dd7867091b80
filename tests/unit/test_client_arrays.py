"""The client's row gathers and scatters equal NumPy fancy indexing for every dtype and layout."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from kvstore_client.arrays import put_rows, take_rows


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int64])
def test_take_and_put_rows_equal_fancy_indexing(dtype):
    rng = np.random.default_rng(4)
    array = rng.standard_normal((50, 6)).astype(dtype)
    positions = rng.integers(0, 50, 30)                       # duplicates included
    got = take_rows(array, positions)
    np.testing.assert_array_equal(got, array[positions])
    assert got.flags.c_contiguous and got.dtype == array.dtype
    targets = rng.permutation(50)[:20]
    out, expected = np.zeros_like(array), np.zeros_like(array)
    put_rows(out, targets, array[:20])
    expected[targets] = array[:20]
    np.testing.assert_array_equal(out, expected)


def test_strided_and_one_dimensional_arrays_take_the_plain_path():
    array = np.arange(40, dtype=np.float32).reshape(10, 4)
    strided = array[:, ::2]                                   # not C-contiguous
    np.testing.assert_array_equal(take_rows(strided, np.array([1, 1, 7])), strided[[1, 1, 7]])
    np.testing.assert_array_equal(take_rows(np.arange(5), np.array([4, 0])), [4, 0])
    out = np.zeros((10, 4), np.float32)
    put_rows(out, np.array([2, 5]), array[:2, :][:, [3, 2, 1, 0]])   # rows not contiguous in memory
    np.testing.assert_array_equal(out[[2, 5]], array[:2, ::-1])
