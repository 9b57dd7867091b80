"""apply_gradients refuses a step that would leave NaN or Inf in a table that does not allow
them, and only such a step: rows whose values are finite are stepped however large their
total (the check first sums the stepped rows and tests each row only when the sum is not finite)."""
from __future__ import annotations

import numpy as np
import pytest

from kvstore import InvalidArgument, OptimizerConfig

from .conftest import table_config

SGD = OptimizerConfig(name="sgd", lr=1.0)


@pytest.mark.parametrize(("dtype", "big"), [("float32", 3e38), ("float16", 60000.0)])
def test_step_of_finite_rows_whose_total_overflows_is_applied(store, dtype, big):
    store.create_table(table_config(dim=8, dtype=dtype, optimizer=SGD))
    ids = np.arange(16, dtype=np.int64)
    store.update("t", ids, np.full((16, 8), big))
    grads = np.full((16, 8), big / 4, dtype=np.float32)        # SGD, lr 1: each weight becomes 3/4 of big
    assert store.apply_gradients("t", ids, grads) == 16
    expected = (np.full((16, 8), big).astype(dtype) - grads).astype(dtype)
    np.testing.assert_array_equal(store.lookup("t", ids).weights, expected)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_step_that_overflows_one_row_is_refused_and_changes_nothing(store, dtype):
    store.create_table(table_config(dim=8, dtype=dtype, optimizer=SGD))
    big = float(np.finfo(dtype).max)
    ids = np.arange(10, dtype=np.int64)
    before = np.ones((10, 8))
    before[7] = big
    store.update("t", ids, before)
    grads = np.zeros((10, 8), dtype=np.float32)
    grads[7, 3] = -big                                            # row 7: max + max = Inf
    with pytest.raises(InvalidArgument, match=r"NaN or Inf into 1 rows .*ids \[7\]"):
        store.apply_gradients("t", ids, grads)
    np.testing.assert_array_equal(store.lookup("t", ids).weights, before.astype(dtype))


def test_table_that_allows_nonfinite_values_takes_the_overflowing_step(store):
    store.create_table(table_config(dim=8, optimizer=SGD, allow_nonfinite=True))
    store.update("t", [1, 2], np.full((2, 8), 3e38))
    grads = np.zeros((2, 8), dtype=np.float32)
    grads[1] = -3e38
    store.apply_gradients("t", [1, 2], grads)
    weights = store.lookup("t", [1, 2]).weights
    assert np.isfinite(weights[0]).all() and np.isinf(weights[1]).all()
