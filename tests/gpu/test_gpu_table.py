"""A table with its cache on the GPU keeps every promise the host table keeps, and speaks torch."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from kvstore import CacheConfig, OptimizerConfig, Store, TableConfig
from kvstore.rows import encode_keys

from .conftest import require_gpu

cupy = require_gpu()


def config(name: str, device: str, optimizer: str = "adam", write: str = "write_back", dtype: str = "float32",
           rows: int = 256) -> TableConfig:
    return TableConfig(name=name, dim=16, dtype=dtype, optimizer=OptimizerConfig(name=optimizer, lr=0.05),
                       cache=CacheConfig(rows=rows, ways=32, write=write, device=device))


@pytest.fixture
def store(tmp_path):
    with Store(str(tmp_path / "data"), clock=lambda: 1_700_000_000.0) as opened:
        yield opened


def close(got, want, tolerance: float = 1e-6) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    assert np.linalg.norm(got - want) <= tolerance * max(np.linalg.norm(want), 1e-30)


@pytest.mark.parametrize("write", ["write_back", "write_through"])
@pytest.mark.parametrize("optimizer", ["adam", "rowwise_adagrad"])
def test_gpu_table_matches_host_table_through_evictions(store, write, optimizer):
    """A small cache (many evictions, write-backs, RocksDB misses): same rows as the host table."""
    store.create_table(config("host", "cpu", optimizer, write))
    store.create_table(config("gpu", "cuda:0", optimizer, write))
    rng = np.random.default_rng(11)
    for batch in range(30):
        ids = rng.integers(-3000, 3000, 700)
        a = store.lookup("host", ids, with_state=True)
        b = store.lookup("gpu", ids, with_state=True)
        assert isinstance(b.weights, np.ndarray)
        close(b.weights, a.weights)
        close(b.state, a.state)
        grads = rng.standard_normal((len(ids), 16)).astype(np.float32)
        scores = rng.random(len(ids)) if batch % 3 == 0 else None
        assert (store.table("host").apply_gradients(ids, grads, scores=scores)
                == store.table("gpu").apply_gradients(ids, grads, scores=scores))
        if batch % 7 == 3:
            new = rng.standard_normal((50, 16)).astype(np.float32)
            scores = rng.random(50)
            store.table("host").update(ids[:50], new, scores=scores)
            store.table("gpu").update(ids[:50], new, scores=scores)
    store.flush()
    everything = np.arange(-3000, 3000)
    stored = {}
    for name in ("host", "gpu"):           # what RocksDB holds, headers included
        layout = store.table(name).layout
        values = store.rocks.get(store.table(name).family, encode_keys(everything))
        present = np.array([v is not None for v in values])
        stored[name] = (present, layout.from_values([v for v in values if v is not None]), layout)
    np.testing.assert_array_equal(stored["gpu"][0], stored["host"][0])
    (_, host_rows, layout), gpu_rows = stored["host"], stored["gpu"][1]
    np.testing.assert_array_equal(gpu_rows[:, :16], host_rows[:, :16])   # version, score, count, last_access, step
    close(layout.weights(gpu_rows), layout.weights(host_rows))
    close(layout.state(gpu_rows), layout.state(host_rows))
    close(store.lookup("gpu", everything, on_miss="zeros").weights,
          store.lookup("host", everything, on_miss="zeros").weights)
    for name in ("host", "gpu"):
        stats = store.stats(name)
        assert stats["cache_rows"] <= 256 and stats["cache_dirty_rows"] == 0


def test_lookup_modes_and_delete_match_host(store):
    store.create_table(config("host", "cpu"))
    store.create_table(config("gpu", "cuda:0"))
    ids = np.array([5, 7, 5, -9], dtype=np.int64)
    for mode in ("init", "zeros", "init_insert"):
        np.testing.assert_array_equal(store.lookup("gpu", ids, on_miss=mode).weights,
                                      store.lookup("host", ids, on_miss=mode).weights)
    for name in ("host", "gpu"):
        store.delete(name, [5])
    np.testing.assert_array_equal(store.lookup("gpu", ids, on_miss="zeros").weights,
                                  store.lookup("host", ids, on_miss="zeros").weights)


def test_a_cached_lookup_without_waiting_equals_the_host_tables(store):
    """`lookup_if_cached` (what a server serves on its event loop) on a GPU table: the rows and
    access counts a host table gives; one uncached id gives None and changes nothing."""
    ids = np.arange(100)
    weights = np.random.default_rng(5).standard_normal((100, 16)).astype(np.float32)
    for name, device in (("host", "cpu"), ("gpu", "cuda:0")):
        store.create_table(config(name, device))
        store.update(name, ids, weights)
    query = np.array([7, 3, 7, 99])
    host, gpu = store.lookup_if_cached("host", query, True), store.lookup_if_cached("gpu", query, True)
    np.testing.assert_array_equal(gpu.weights, host.weights)
    np.testing.assert_array_equal(gpu.state, host.state)
    counted = ("cache_hits", "cache_misses", "rows_initialized", "rows_read")

    def counts(name):
        return [store.stats(name).get(key, 0) for key in counted]
    assert counts("gpu") == counts("host")
    assert store.lookup_if_cached("gpu", [1, 5000]) is None
    assert store.lookup_if_cached("host", [1, 5000]) is None
    assert counts("gpu") == counts("host")   # neither counted the refused lookup


def _busy_device():
    """Keep the current stream busy until the returned event is set (a host function queued on
    it blocks the stream, not this thread): the state a server's event loop must not wait on.
    A call that waits anyway goes on after 60 s, to fail its test instead of hanging it."""
    free = threading.Event()
    cupy.cuda.get_current_stream().launch_host_func(lambda _: free.wait(60), None)
    return free


def test_nothing_waits_on_the_loop_for_a_busy_device_or_a_gpu_step(store):
    """While the device has queued work a cached lookup gives None at once (a server's event loop
    must not wait for other calls' kernels) and changes nothing; once idle it answers. A GPU
    table's step is never run there (`apply_gradients_if_cached` gives None, nothing stepped)."""
    ids = np.arange(100)
    weights = np.random.default_rng(5).standard_normal((100, 16)).astype(np.float32)
    store.create_table(config("gpu", "cuda:0", optimizer="rowwise_adagrad"))
    store.update("gpu", ids, weights)

    def seen():
        found = store.lookup("gpu", ids, on_miss="error", with_state=True)
        return found.weights, found.state, store.stats("gpu").get("rows_stepped", 0)
    before, hits = seen(), store.stats("gpu")["cache_hits"]
    free = _busy_device()
    try:
        assert store.lookup_if_cached("gpu", [1, 2]) is None
    finally:
        free.set()
        cupy.cuda.get_current_stream().synchronize()
    assert store.apply_gradients_if_cached("gpu", [1, 2], np.ones((2, 16), np.float32)) is None
    assert store.stats("gpu")["cache_hits"] == hits
    for got, want in zip(seen(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(store.lookup_if_cached("gpu", [1, 2]).weights, weights[[1, 2]])


def test_torch_cuda_tensors_in_and_out(store):
    torch = pytest.importorskip("torch")
    store.create_table(config("gpu", "cuda:0"))
    store.create_table(config("host", "cpu"))
    ids = torch.tensor([3, 1, 3, 8], device="cuda")
    weights = torch.randn(4, 16, device="cuda")
    store.update("gpu", ids, weights)
    store.update("host", ids.cpu().numpy(), weights.cpu().numpy())
    got = store.lookup("gpu", ids)
    assert isinstance(got.weights, torch.Tensor) and got.weights.is_cuda and got.weights.dtype == torch.float32
    np.testing.assert_array_equal(got.weights.cpu().numpy(), store.lookup("host", ids.cpu().numpy()).weights)
    grads = torch.randn(4, 16, device="cuda")
    store.table("gpu").apply_gradients(ids, grads)
    store.table("host").apply_gradients(ids.cpu().numpy(), grads.cpu().numpy())
    close(store.lookup("gpu", ids).weights.cpu().numpy(), store.lookup("host", ids.cpu().numpy()).weights)
    as_cupy = store.lookup("gpu", cupy.asarray([1, 8])).weights
    assert isinstance(as_cupy, cupy.ndarray)


def test_bfloat16_table_speaks_torch_bfloat16(store):
    torch = pytest.importorskip("torch")
    store.create_table(config("gpu", "cuda:0", dtype="bfloat16"))
    ids = torch.arange(10, device="cuda")
    weights = torch.randn(10, 16, device="cuda", dtype=torch.bfloat16)
    store.update("gpu", ids, weights)
    got = store.lookup("gpu", ids).weights
    assert got.dtype == torch.bfloat16 and torch.equal(got, weights)
    host = store.lookup("gpu", ids.cpu().numpy()).weights
    np.testing.assert_array_equal(host.astype(np.float32), weights.float().cpu().numpy())


def test_gpu_table_survives_reopen(tmp_path):
    path = str(tmp_path / "data")
    with Store(path) as store:
        store.create_table(config("gpu", "cuda:0"))
        store.update("gpu", np.arange(100), np.ones((100, 16), dtype=np.float32))
    with Store(path) as store:
        np.testing.assert_array_equal(store.lookup("gpu", np.arange(100), on_miss="error").weights,
                                      np.ones((100, 16), dtype=np.float32))


def test_nonfinite_gradients_from_the_device_are_refused(store):
    from kvstore import InvalidArgument

    store.create_table(config("gpu", "cuda:0"))
    grads = cupy.full((2, 16), cupy.nan, dtype=cupy.float32)
    with pytest.raises(InvalidArgument, match="grads"):
        store.table("gpu").apply_gradients(cupy.asarray([1, 2]), grads)


CASES = [   # (dtype, where the step overflows, optimizer, gradient value); lr 10
    *((dtype, "weights", "sgd", value) for dtype, value in (("float32", 3e38), ("float16", 1e4),
                                                           ("bfloat16", 3e38))),
    *((dtype, "state", "adagrad", 1e30) for dtype in ("float32", "float16", "bfloat16", "float64")),
]   # the state case: the squared sum overflows float32 while the weights stay finite


@pytest.mark.parametrize("dtype, where, optimizer, value", CASES)
def test_steps_that_would_write_nan_or_inf_are_refused_like_on_the_host_table(store, dtype, where, optimizer, value):
    """The GPU tier finds the same non-finite rows as the host tier, in weights and in state, for
    every weight type, names the same ids, and changes nothing."""
    from kvstore import InvalidArgument

    messages = []
    for name, device in (("host", "cpu"), ("gpu", "cuda:0")):
        cache = CacheConfig(rows=256, ways=32, device=device)
        store.create_table(TableConfig(name=name, dim=16, dtype=dtype, cache=cache,
                                       optimizer=OptimizerConfig(name=optimizer, lr=10.0)))
        ids = np.arange(40)
        store.update(name, ids, np.ones((40, 16), dtype=np.float32))
        grads = np.zeros((40, 16), dtype=np.float32)
        grads[[3, 17, 29], 5] = value
        with pytest.raises(InvalidArgument, match="grads") as refused:
            store.table(name).apply_gradients(ids, grads)
        messages.append(str(refused.value).replace(repr(name), "T"))
        np.testing.assert_array_equal(np.asarray(store.lookup(name, ids).weights, dtype=np.float32), 1.0)
        grads[[3, 17, 29], 5] = 1.0       # the same step without the overflow goes through
        assert store.table(name).apply_gradients(ids, grads) == 40
    assert messages[0] == messages[1] and "[3, 17, 29]" in messages[0], messages


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam"])
def test_steps_of_cached_rows_keep_what_the_host_table_keeps_nan_and_inf_included(store, optimizer):
    """Batches whose rows are all cached take the tier's one-call step (`step_cached`), batches
    with a new id the staged path: answers, refusals and rows equal the host table's, in a
    table that refuses NaN and Inf and in one that allows them."""
    from kvstore import InvalidArgument

    rng = np.random.default_rng(5)
    for allow in (False, True):
        for name, device in ((f"host{allow}", "cpu"), (f"gpu{allow}", "cuda:0")):
            store.create_table(TableConfig(name=name, dim=16, allow_nonfinite=allow,
                                           optimizer=OptimizerConfig(name=optimizer, lr=0.05),
                                           cache=CacheConfig(rows=4096, ways=32, device=device)))
            store.lookup(name, np.arange(600))                   # rows 0..599 cached
        steps = []
        for batch in range(12):
            ids = rng.choice(600 if batch < 9 else 800, 200, replace=False)    # the last three: new rows too
            grads = rng.standard_normal((200, 16)).astype(np.float32)
            if batch in (4, 10):
                grads[7, 3] = np.inf
            steps.append((ids, grads))
        for ids, grads in steps:
            answers = []
            for name in (f"host{allow}", f"gpu{allow}"):
                try:
                    answers.append(store.table(name).apply_gradients(ids, grads))
                except InvalidArgument as refused:
                    answers.append(str(refused).replace(name, "T"))
            assert answers[0] == answers[1]
        everything = np.arange(800)
        a = store.lookup(f"host{allow}", everything, with_state=True)
        b = store.lookup(f"gpu{allow}", everything, with_state=True)
        np.testing.assert_allclose(np.asarray(b.weights), a.weights, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(b.state), a.state, rtol=1e-5, atol=1e-6)
        assert np.isfinite(a.weights).all() != allow
        assert store.table(f"host{allow}").counters["rows_stepped"] == store.table(f"gpu{allow}").counters[
            "rows_stepped"]


def test_steps_of_tables_of_new_shapes_compile_no_kernel(request, store):
    """A table's kernels are compiled when it is created: its first steps, of any batch size,
    its first stats and its first flush compile nothing (NVRTC would stall a fresh server for
    seconds each, the flush under the table lock)."""
    shapes = [("float32", 16, "adagrad"), ("float16", 24, "adagrad"), ("bfloat16", 40, "adam"),
              ("float32", 72, "rowwise_adagrad"), ("float64", 8, "sgd")]
    for n, (dtype, dim, optimizer) in enumerate(shapes):      # caches of 2,048 to 524,288 slots
        store.create_table(TableConfig(name=f"t{n}", dim=dim, dtype=dtype, optimizer=OptimizerConfig(name=optimizer),
                                       cache=CacheConfig(rows=2048 * 4**n, ways=32, device="cuda:0",
                                                         flush_seconds=3600)))     # flushed by the test alone
    rng = np.random.default_rng(5)
    for batch in (5, 3000):               # the shared path, once (a scan of over 256 items compiles one more kernel)
        store.apply_gradients("t0", np.arange(batch) * 7, np.ones((batch, 16), np.float32))
    store.stats("t0")
    store.table("t0").flush()
    compiles = request.getfixturevalue("compiles")     # counted from here on, after the warm-up
    stats, flushed = [], []
    for n, (_, dim, _) in enumerate(shapes):
        for batch in (3, 700, 3000):
            ids = rng.integers(0, 10_000, batch)
            assert store.apply_gradients(f"t{n}", ids, rng.standard_normal((batch, dim)).astype(np.float32)) > 0
        stats.append(store.stats(f"t{n}"))         # what a metrics scrape or a Stats call reads
        store.table(f"t{n}").flush()               # what the flusher does each second (dirty rows to RocksDB)
        flushed.append(store.stats(f"t{n}"))
    assert compiles == [], "\n\n".join(compiles)
    for n, (counters, after) in enumerate(zip(stats, flushed, strict=True)):
        assert counters["cache_rows"] == len(store.table(f"t{n}").cache.cached_ids()) > 0
        assert counters["cache_locked_rows"] == 0
        assert after["cache_dirty_rows"] == 0 and after["cache_rows"] == counters["cache_rows"]


def test_prefetch_locks_survive_evictions_and_release_like_host(store):
    for name, device in (("host", "cpu"), ("gpu", "cuda:0")):
        store.create_table(config(name, device, rows=64))
    pinned = np.arange(40)
    counts = [store.table(name).prefetch(pinned, lock=True, owner="a") for name in ("host", "gpu")]
    assert counts[0] == counts[1]
    for name in ("host", "gpu"):
        store.lookup(name, np.arange(1000, 1300))                 # far more ids than free ways
    host_cached = store.table("host").cache.probe(pinned) >= 0
    gpu_cached = cupy.asnumpy(store.table("gpu").cache.probe(pinned)) >= 0
    np.testing.assert_array_equal(gpu_cached, host_cached)
    assert host_cached.sum() == counts[0]
    assert store.stats("gpu")["cache_locked_rows"] == store.stats("host")["cache_locked_rows"] == counts[0]
    for name in ("host", "gpu"):
        store.table(name).release_all("a")
        assert store.stats(name)["cache_locked_rows"] == 0


def test_a_fresh_process_compiles_only_the_kernels_its_tables_step_with(tmp_path):
    """With an empty CuPy disk cache, a GPU table of one optimizer compiles that optimizer's fused
    steps (4 variants of one weight type, when the table is created), not all 80: the first
    CreateTable on a fresh GPU host then fits a client's deadline. A second optimizer compiles its
    own 4."""
    import os
    import re
    import subprocess
    import sys

    script = """
import sys, numpy as np
from kvstore import CacheConfig, OptimizerConfig, Store, TableConfig
with Store(sys.argv[1]) as store:
    for name in sys.argv[2:]:
        store.create_table(TableConfig(name=name, dim=16, optimizer=OptimizerConfig(name=name, lr=0.1),
                                       cache=CacheConfig(rows=256, ways=32, device="cuda:0")))
        store.apply_gradients(name, np.arange(8), np.ones((8, 16), np.float32))
"""
    counts = []
    for optimizers in (["adagrad"], ["adagrad", "adam"]):
        cache = tmp_path / f"cupy-{len(optimizers)}"
        env = dict(os.environ, CUPY_CACHE_DIR=str(cache))
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"data-{len(optimizers)}"), *optimizers],
                       env=env, check=True, timeout=600)
        steps = set()
        for path in cache.rglob("*"):
            if path.is_file():
                steps |= set(re.findall(rb"_Z14optimizer_stepI(\w+?)EEv", path.read_bytes()))   # template args
        counts.append(len(steps))
    assert counts == [4, 8]
