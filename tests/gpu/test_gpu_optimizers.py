"""Fused optimizer kernels equal the host optimizers (kvstore.optimizers) within float32 rounding."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from kvstore import CacheConfig, OptimizerConfig, TableConfig
from kvstore.optimizers import make_optimizer
from kvstore.rows import RowLayout

from .conftest import require_gpu

cupy = require_gpu()
from kvstore.gpu_cache import GpuCache  # noqa: E402  (needs CuPy)

OPTIMIZERS = ["sgd", "adagrad", "rowwise_adagrad", "adam", "partial_rowwise_adam"]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    want = want.astype(np.float64)
    return float(np.linalg.norm(got.astype(np.float64) - want) / max(np.linalg.norm(want), 1e-30))


def host_step(layout: RowLayout, optimizer: OptimizerConfig, sub: np.ndarray, grads: np.ndarray, now: int) -> None:
    """What a fused step with `now` does to rows `sub`, by the host optimizer (in place)."""
    weights = layout.weights(sub).astype(np.float32)
    state = layout.state(sub).copy()
    header = layout.header(sub)
    header["step"] += 1
    header["count"] += 1
    header["last_access"] = now
    make_optimizer(optimizer, layout.dim).step(weights, state, grads, header["step"])
    layout.weights(sub)[:] = weights.astype(layout.dtype)
    layout.state(sub)[:] = state


def random_rows(layout: RowLayout, n: int, rng) -> np.ndarray:
    rows = layout.empty(n)
    layout.weights(rows)[:] = rng.standard_normal((n, layout.dim)).astype(layout.dtype)
    layout.state(rows)[:] = rng.random((n, layout.state_dim)).astype(np.float32)   # >= 0: G and v
    layout.header(rows)["step"] = rng.integers(0, 50, n)
    return rows


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dim", [128, 100, 37, 200])   # vector path, scalar, wide
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_fused_step_equals_host_optimizer(name, dim, weight_decay):
    rng = np.random.default_rng(zlib.crc32(f"{name}-{dim}-{weight_decay}".encode()))
    optimizer = OptimizerConfig(name=name, lr=0.05, weight_decay=weight_decay)
    config = TableConfig(name="t", dim=dim, optimizer=optimizer, cache=CacheConfig(rows=4096, ways=32))
    layout = RowLayout.of(config)
    gpu = GpuCache(config.cache, layout.row_bytes)
    rows = random_rows(layout, 4096, rng)
    gpu.scatter_rows(cupy.arange(len(rows)), cupy.asarray(rows))
    for step in range(3):
        slots = rng.permutation(4096)[:3000]
        grads = rng.standard_normal((3000, dim)).astype(np.float32)
        sub = rows[slots]
        host_step(layout, optimizer, sub, grads, 1000 + step)
        rows[slots] = sub
        gpu.dirty[:] = False
        gpu.optimizer_step(slots, grads, optimizer, layout, now=1000 + step)
        got = gpu.gather_rows(cupy.arange(gpu.capacity)).get()
        assert rel_err(layout.weights(got), layout.weights(rows)) <= 1e-6
        if layout.state_dim:
            assert rel_err(layout.state(got), layout.state(rows)) <= 1e-6
        np.testing.assert_array_equal(got[:, :16], rows[:, :16])          # headers: step, count, last_access
        assert gpu.dirty.get()[slots].all() and gpu.dirty.sum() == len(slots)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_fused_step_keeps_weights_in_the_table_dtype(dtype):
    rng = np.random.default_rng(9)
    optimizer = OptimizerConfig(name="adam", lr=0.01)
    config = TableConfig(name="t", dim=64, dtype=dtype, optimizer=optimizer, cache=CacheConfig(rows=1024, ways=32))
    layout = RowLayout.of(config)
    gpu = GpuCache(config.cache, layout.row_bytes)
    rows = random_rows(layout, 1024, rng)
    gpu.scatter_rows(cupy.arange(len(rows)), cupy.asarray(rows))
    grads = rng.standard_normal((1024, 64)).astype(np.float32)
    weights = layout.weights(rows).astype(np.float32)
    state = layout.state(rows).copy()
    make_optimizer(optimizer, 64).step(weights, state, grads, layout.header(rows)["step"] + 1)
    gpu.optimizer_step(np.arange(1024), grads, optimizer, layout)
    got = gpu.gather_rows(cupy.arange(gpu.capacity)).get()
    want = weights.astype(layout.dtype).astype(np.float64)
    tolerance = {"bfloat16": 1e-2, "float16": 1e-3, "float64": 1e-6}[dtype]
    assert rel_err(layout.weights(got), want) <= tolerance
    assert rel_err(layout.state(got), state) <= 1e-6


def test_fused_step_on_unaligned_gradients_equals_aligned():
    """Gradients at an address that is no multiple of 16 take the scalar path: same result."""
    rng = np.random.default_rng(4)
    optimizer = OptimizerConfig(name="adagrad", lr=0.05)
    config = TableConfig(name="t", dim=128, optimizer=optimizer, cache=CacheConfig(rows=1024, ways=32))
    layout = RowLayout.of(config)
    rows = random_rows(layout, 1024, rng)
    grads = rng.standard_normal((1024, 128)).astype(np.float32)
    results = []
    for offset in (0, 1):
        gpu = GpuCache(config.cache, layout.row_bytes)
        gpu.scatter_rows(cupy.arange(len(rows)), cupy.asarray(rows))
        flat = cupy.empty(grads.size + offset, dtype=cupy.float32)
        moved = flat[offset:].reshape(grads.shape)
        moved[:] = cupy.asarray(grads)
        assert (moved.data.ptr % 16 == 0) == (offset == 0)
        gpu.optimizer_step(np.arange(1024), moved, optimizer, layout)
        results.append(gpu.gather_rows(cupy.arange(gpu.capacity)).get())
    np.testing.assert_array_equal(results[0][:, :16], results[1][:, :16])
    assert rel_err(layout.weights(results[1]), layout.weights(results[0])) <= 1e-6
    assert rel_err(layout.state(results[1]), layout.state(results[0])) <= 1e-6


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dim", [128, 37, 200])   # vector path, scalar, wide
def test_apply_gradients_sums_each_ids_rows_then_steps_like_the_host(name, dim):
    from kvstore.optimizers import sum_duplicates

    rng = np.random.default_rng(zlib.crc32(f"apply-{name}-{dim}".encode()))
    optimizer = OptimizerConfig(name=name, lr=0.05, weight_decay=0.01)
    config = TableConfig(name="t", dim=dim, optimizer=optimizer, cache=CacheConfig(rows=4096, ways=32))
    layout = RowLayout.of(config)
    gpu = GpuCache(config.cache, layout.row_bytes)
    cached = rng.choice(2**40, 1500, replace=False).astype(np.int64)
    gpu.begin_batch()
    claim = gpu.find_or_insert(cached)
    assert bool((claim.slots >= 0).all())
    rows = random_rows(layout, len(cached), rng)
    gpu.scatter_rows(claim.slots, cupy.asarray(rows))
    uncached = np.arange(2**41, 2**41 + 50, dtype=np.int64)
    ids = rng.permutation(np.concatenate([rng.choice(cached, 3000), uncached]))   # duplicates and misses
    grads = rng.standard_normal((len(ids), dim)).astype(np.float32)
    gpu.begin_batch()
    uniq, slots = gpu.apply_gradients(cupy.asarray(ids), cupy.asarray(grads), optimizer, layout, now=77)
    uniq, slots = uniq.get(), slots.get()
    assert sorted(uniq.tolist()) == sorted(set(ids.tolist()))
    assert ((slots < 0) == np.isin(uniq, uncached)).all()
    hits = int((slots >= 0).sum())
    assert (slots[:hits] >= 0).all() and (np.diff(slots[:hits]) > 0).all()   # cached first, in slot order

    summed_ids, summed = sum_duplicates(ids, grads)
    stepped = np.isin(summed_ids, cached)
    where = {int(i): k for k, i in enumerate(cached)}
    at = np.array([where[int(i)] for i in summed_ids[stepped]])
    sub = rows[at]
    host_step(layout, optimizer, sub, summed[stepped], 77)
    rows[at] = sub
    got = gpu.gather_rows(claim.slots).get()
    assert rel_err(layout.weights(got), layout.weights(rows)) <= 1e-6
    if layout.state_dim:
        assert rel_err(layout.state(got), layout.state(rows)) <= 1e-6
    np.testing.assert_array_equal(got[:, :16], rows[:, :16])
    assert int(gpu.dirty.sum()) == int(stepped.sum())


UNCACHED = np.arange(10_000, 10_050)
BATCHES = {                                  # of the 100 cached ids 100..199 (and uncached ones)
    "unique, cached and not": np.concatenate([np.arange(100, 200), UNCACHED]),
    "unique cached, uncached three times": np.concatenate([np.arange(100, 200), np.repeat(UNCACHED, 3)]),
    "cached three times": np.repeat(np.arange(100, 200), 3),
    "uncached three times": np.repeat(np.arange(10_000, 10_100), 3),
}


@pytest.mark.parametrize("batch", list(BATCHES))
def test_apply_gradients_sums_repeats_and_reports_each_id_once(batch):
    optimizer = OptimizerConfig(name="sgd", lr=1.0)
    config = TableConfig(name="t", dim=8, optimizer=optimizer, cache=CacheConfig(rows=1024, ways=32))
    layout = RowLayout.of(config)
    gpu = GpuCache(config.cache, layout.row_bytes)
    gpu.begin_batch()
    cached = np.arange(100, 200, dtype=np.int64)
    claim = gpu.find_or_insert(cached)
    gpu.scatter_rows(claim.slots, cupy.zeros((len(cached), layout.row_bytes), dtype=cupy.uint8))
    ids = np.random.default_rng(3).permutation(BATCHES[batch])
    gpu.begin_batch()
    uniq, slots = gpu.apply_gradients(cupy.asarray(ids), cupy.ones((len(ids), 8), dtype=cupy.float32),
                                      optimizer, layout)
    uniq, slots = uniq.get(), slots.get()
    assert sorted(uniq.tolist()) == sorted(set(ids.tolist()))
    assert ((slots >= 0) == np.isin(uniq, cached)).all()
    times = {int(i): int((ids == i).sum()) for i in cached}
    weights = layout.weights(gpu.gather_rows(claim.slots).get())
    expected = -np.array([times[int(i)] for i in cached], np.float32)[:, None] * np.ones(8, np.float32)
    np.testing.assert_array_equal(weights, expected)       # each cached id stepped once, with its rows summed
    np.testing.assert_array_equal(gpu.dirty[claim.slots].get(), [times[int(i)] > 0 for i in cached])


def test_apply_gradients_of_no_rows_changes_nothing():
    optimizer = OptimizerConfig(name="sgd", lr=1.0)
    config = TableConfig(name="t", dim=8, optimizer=optimizer, cache=CacheConfig(rows=1024, ways=32))
    gpu = GpuCache(config.cache, RowLayout.of(config).row_bytes)
    uniq, slots = gpu.apply_gradients(cupy.zeros(0, dtype=cupy.int64), cupy.zeros((0, 8), dtype=cupy.float32),
                                      optimizer, RowLayout.of(config))
    assert len(uniq) == len(slots) == 0 and int(gpu.dirty.sum()) == 0
