"""Server-side optimizers against references: torch.optim on a dense nn.Embedding
for SGD, Adagrad and Adam; an independent float64 NumPy loop of the documented
formula for the rowwise variants."""
from __future__ import annotations

import numpy as np
import pytest

from kvstore import CacheConfig, OptimizerConfig, Store, TableConfig

DIM, ROWS, STEPS = 8, 50, 20
HYPER = dict(lr=0.05, weight_decay=0.01, eps=1e-8)


def _batches(seed: int):
    """20 batches that touch every row (dense torch steps every row) plus duplicates."""
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        ids = np.concatenate([rng.permutation(ROWS), rng.integers(0, ROWS, 30)])
        yield ids, rng.standard_normal((len(ids), DIM)).astype(np.float32)


def _store_run(tmp_path, name: str, seed: int):
    store = Store(str(tmp_path / name))
    # a cache smaller than the table, so steps also run on rows read back from RocksDB
    store.create_table(TableConfig("t", DIM, optimizer=OptimizerConfig(name, **HYPER),
                                   cache=CacheConfig(rows=16, ways=8)))
    initial = store.lookup("t", np.arange(ROWS)).weights.copy()
    for ids, grads in _batches(seed):
        store.apply_gradients("t", ids, grads)
    result = store.lookup("t", np.arange(ROWS), with_state=True)
    store.close()
    return initial, result


def _close(got, ref):
    """Within 1e-6 relative to the scale of the reference (float32 rounding differs in order)."""
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * float(np.abs(ref).max()))


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_optimizer_matches_torch_optim_on_dense_embedding(tmp_path, name):
    torch = pytest.importorskip("torch")
    initial, result = _store_run(tmp_path, name, seed=1)
    emb = torch.nn.Embedding(ROWS, DIM)
    emb.weight.data = torch.tensor(initial)
    kw = dict(lr=HYPER["lr"], weight_decay=HYPER["weight_decay"])
    opt = {
        "sgd": lambda p: torch.optim.SGD(p, **kw),
        "adagrad": lambda p: torch.optim.Adagrad(p, eps=HYPER["eps"], **kw),
        "adam": lambda p: torch.optim.Adam(p, eps=HYPER["eps"], **kw),
    }[name](emb.parameters())
    for ids, grads in _batches(seed=1):
        opt.zero_grad()
        emb(torch.tensor(ids)).backward(torch.tensor(grads))
        opt.step()
    _close(result.weights, emb.weight.detach().numpy())
    if name == "adagrad":
        _close(result.state, opt.state[emb.weight]["sum"].numpy())
    if name == "adam":
        state = opt.state[emb.weight]
        _close(result.state[:, :DIM], state["exp_avg"].numpy())
        _close(result.state[:, DIM:], state["exp_avg_sq"].numpy())


def _rowwise_reference(initial, name: str, seed: int):
    """The documented formulas, one row at a time in float64."""
    c = OptimizerConfig(name, **HYPER)
    w = initial.astype(np.float64)
    acc = np.zeros(ROWS)                  # rowwise Adagrad G / partial rowwise Adam v
    m = np.zeros((ROWS, DIM))
    steps = np.zeros(ROWS)
    for ids, grads in _batches(seed):
        summed = {}
        for i, g in zip(ids, grads.astype(np.float64), strict=True):
            summed[i] = summed.get(i, 0) + g
        for i, g in summed.items():
            g = g + c.weight_decay * w[i]
            if name == "rowwise_adagrad":
                acc[i] += np.mean(g * g)
                w[i] -= c.lr * g / (np.sqrt(acc[i]) + c.eps)
            else:
                steps[i] += 1
                m[i] = c.beta1 * m[i] + (1 - c.beta1) * g
                acc[i] = c.beta2 * acc[i] + (1 - c.beta2) * np.mean(g * g)
                m_hat = m[i] / (1 - c.beta1 ** steps[i])
                v_hat = acc[i] / (1 - c.beta2 ** steps[i])
                w[i] -= c.lr * m_hat / (np.sqrt(v_hat) + c.eps)
    return w, acc, m


@pytest.mark.parametrize("name", ["rowwise_adagrad", "partial_rowwise_adam"])
def test_rowwise_optimizer_matches_numpy_reference(tmp_path, name):
    initial, result = _store_run(tmp_path, name, seed=2)
    w, acc, m = _rowwise_reference(initial, name, seed=2)
    _close(result.weights, w)
    _close(result.state[:, -1], acc)
    if name == "partial_rowwise_adam":
        _close(result.state[:, :DIM], m)


def test_state_dims_follow_the_design():
    dims = {n: OptimizerConfig(n).state_dim(DIM) for n in
            ["sgd", "adagrad", "rowwise_adagrad", "adam", "partial_rowwise_adam"]}
    assert dims == {"sgd": 0, "adagrad": DIM, "rowwise_adagrad": 1, "adam": 2 * DIM,
                    "partial_rowwise_adam": DIM + 1}


def test_apply_gradients_initializes_missing_rows_like_init_insert(tmp_path):
    store = Store(str(tmp_path / "db"))
    store.create_table(TableConfig("t", DIM, optimizer=OptimizerConfig("sgd", lr=1.0)))
    fresh = store.lookup("t", [7], on_miss="init").weights
    store.apply_gradients("t", [7, 7], np.ones((2, DIM), np.float32))
    np.testing.assert_allclose(store.lookup("t", [7], on_miss="error").weights, fresh - 2.0, rtol=1e-6)
    store.close()


def test_prefetch_lock_pins_rows_until_apply_gradients_releases_them(tmp_path):
    store = Store(str(tmp_path / "db"))
    store.create_table(TableConfig("t", DIM, cache=CacheConfig(rows=4, ways=4)))   # one set of 4 ways
    table = store.table("t")
    assert store.prefetch("t", [1, 2, 3, 4], lock=True, owner="w") == 4
    store.lookup("t", np.arange(100, 120))            # a flood of misses cannot evict pinned rows
    assert (table.cache.probe(np.array([1, 2, 3, 4])) >= 0).all()
    store.apply_gradients("t", [1, 2], np.zeros((2, DIM), np.float32), owner="w")
    assert store.release_owner("w") == 2              # 3 and 4 were still held
    assert (table.cache.locks == 0).all()
    store.close()


def test_invalid_gradients_change_nothing(tmp_path):
    from kvstore import InvalidArgument

    store = Store(str(tmp_path / "db"))
    store.create_table(TableConfig("t", DIM))
    before = store.lookup("t", [1, 2]).weights.copy()
    bad = np.ones((2, DIM), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(InvalidArgument, match="grads"):
        store.apply_gradients("t", [1, 2], bad)
    with pytest.raises(InvalidArgument, match="grads"):
        store.apply_gradients("t", [1, 2], np.ones((2, DIM + 1), np.float32))
    np.testing.assert_array_equal(store.lookup("t", [1, 2]).weights, before)
    store.close()


def _formula(name: str, c, w, state, g, t):
    """One step of the documented formula for one row, in float64 (reference for Optimizer.step)."""
    g = g + c.weight_decay * w
    dim = len(w)
    if name == "sgd":
        return w - c.lr * g, state
    if name == "adagrad":
        state = state + g * g
        return w - c.lr * g / (np.sqrt(state) + c.eps), state
    if name == "rowwise_adagrad":
        state = state + np.mean(g * g)
        return w - c.lr * g / (np.sqrt(state[0]) + c.eps), state
    m = c.beta1 * state[:dim] + (1 - c.beta1) * g
    v = c.beta2 * state[dim:] + (1 - c.beta2) * (np.mean(g * g) if name == "partial_rowwise_adam" else g * g)
    w = w - c.lr * (m / (1 - c.beta1 ** t)) / (np.sqrt(v / (1 - c.beta2 ** t)) + c.eps)
    return w, np.concatenate([m, v])


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad", "adam", "partial_rowwise_adam"])
def test_each_optimizer_step_equals_its_formula_row_by_row(name, weight_decay):
    from kvstore.optimizers import make_optimizer

    rng = np.random.default_rng(len(name))
    c = OptimizerConfig(name, lr=0.05, weight_decay=weight_decay, eps=1e-8)
    n, dim = 64, 16
    weights = rng.standard_normal((n, dim)).astype(np.float32)
    state = rng.random((n, c.state_dim(dim))).astype(np.float32)        # >= 0: accumulators and v
    grads = rng.standard_normal((n, dim)).astype(np.float32)
    steps = rng.integers(1, 30, n).astype(np.uint32)
    want = [_formula(name, c, weights[i].astype(np.float64), state[i].astype(np.float64),
                     grads[i].astype(np.float64), float(steps[i])) for i in range(n)]
    grads_before = grads.copy()
    make_optimizer(c, dim).step(weights, state, grads, steps)
    _close(weights, np.array([w for w, _ in want]))
    if state.shape[1]:
        _close(state, np.array([s for _, s in want]))
    np.testing.assert_array_equal(grads, grads_before)              # the gradients are only read


def _adagrad_in_numpy_passes(weights, state, grads, c):
    """The host Adagrad step as NumPy's whole-batch float32 passes (what it was before it was compiled)."""
    g = grads + np.float32(c.weight_decay) * weights if c.weight_decay else grads
    state += np.square(g)
    update = np.sqrt(state)
    update += np.float32(c.eps)
    np.divide(g, update, out=update)
    update *= np.float32(c.lr)
    weights -= update


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adagrad_gives_the_bits_of_numpys_passes_on_views_of_stored_rows(weight_decay):
    """The compiled step changes no stored bit: rows of dim 64 as the store stages them (weights
    and state strided views of one [n, row_bytes] array), with overflow, NaN and Inf among them."""
    from kvstore.optimizers import make_optimizer

    c = OptimizerConfig("adagrad", lr=0.05, weight_decay=weight_decay, eps=1e-8)
    n, dim = 300, 64
    rng = np.random.default_rng(7)
    rows = np.empty((n, 4 + 2 * dim), np.float32)              # a 16-byte header, weights, state
    rows[:, 4:4 + dim] = rng.standard_normal((n, dim))
    rows[:, 4 + dim:] = rng.random((n, dim))
    grads = rng.standard_normal((n, dim)).astype(np.float32)
    grads[3, 5], grads[4, 6], grads[5, 7], grads[6] = np.nan, np.inf, -np.inf, 3e38    # g^2 overflows in row 6
    want, got = rows.copy(), rows.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        _adagrad_in_numpy_passes(want[:, 4:4 + dim], want[:, 4 + dim:], grads, c)
    make_optimizer(c, dim).step(got[:, 4:4 + dim], got[:, 4 + dim:], grads, None)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.isnan(got[3, 4 + 5]) and not np.isfinite(got[6, 4:]).all()


@pytest.mark.parametrize("n, distinct", [(0, 1), (1, 1), (300, 300), (5000, 40), (5000, 4000)])
def test_sum_duplicates_adds_every_gradient_of_each_id(n, distinct):
    from kvstore.optimizers import sum_duplicates

    rng = np.random.default_rng(n + distinct)
    ids = rng.choice(np.arange(-distinct, distinct) * 7919, size=n) if n != distinct else \
        rng.permutation(distinct).astype(np.int64) - 5
    grads = rng.standard_normal((n, 8)).astype(np.float32)
    uniq, summed = sum_duplicates(ids, grads)
    expected = {}
    for i, g in zip(ids.tolist(), grads.astype(np.float64), strict=True):
        expected[i] = expected.get(i, 0) + g
    assert uniq.tolist() == sorted(expected)
    assert summed.dtype == np.float32 and summed.shape == (len(uniq), 8)
    if len(uniq):
        _close(summed, np.array([expected[i] for i in uniq.tolist()]))


def test_sum_duplicates_of_sorted_distinct_ids_keeps_each_gradient_and_gives_fresh_ids():
    """A de-duplicating client's batch (sorted, distinct) skips the sort: same answer, and the
    ids returned are not the caller's array (a change feed may keep them)."""
    from kvstore.optimizers import sum_duplicates

    ids = np.array([-9, -2, 0, 5, 7919, 2**40], dtype=np.int64)
    grads = np.random.default_rng(5).standard_normal((6, 4)).astype(np.float32)
    uniq, summed = sum_duplicates(ids, grads)
    np.testing.assert_array_equal(uniq, ids)
    np.testing.assert_array_equal(summed, grads)
    ids[0] = 123
    assert uniq[0] == -9
    uniq, summed = sum_duplicates(np.array([3, 3, 4]), np.ones((3, 2), np.float64))   # a tie is not distinct
    assert uniq.tolist() == [3, 4] and summed.tolist() == [[2, 2], [1, 1]] and summed.dtype == np.float32


def test_sum_duplicates_is_the_same_for_the_same_batch():
    """The order of additions is fixed (request order): replaying a batch gives the same bits."""
    from kvstore.optimizers import sum_duplicates

    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50, 4000)
    grads = rng.standard_normal((4000, 32)).astype(np.float32)
    np.testing.assert_array_equal(sum_duplicates(ids, grads)[1], sum_duplicates(ids.copy(), grads.copy())[1])


def test_sum_duplicates_gives_the_bits_of_a_float32_sum_from_zero_in_request_order():
    """Server and client sum the same batch alike: each id's rows added in float32, starting at
    zero, in the order they came (so a -0.0 gradient alone sums to +0.0), whatever the ids."""
    from kvstore.optimizers import sum_duplicates

    rng = np.random.default_rng(11)
    ids = np.concatenate([rng.integers(0, 30, 600) << 40, np.array([-1, 2**63 - 1, -(2**63)]),
                          rng.integers(-5, 5, 400)])
    rng.shuffle(ids)
    grads = rng.standard_normal((len(ids), 5)).astype(np.float32) * np.float32(1e3)
    grads[ids == -1] = -0.0
    uniq, summed = sum_duplicates(ids, grads)
    expected = {}
    for i, row in zip(ids.tolist(), grads, strict=True):
        expected[i] = expected.get(i, np.zeros(5, np.float32)) + row      # float32 adds, from +0.0
    assert uniq.tolist() == sorted(expected)
    assert summed.tobytes() == np.array([expected[i] for i in uniq.tolist()], np.float32).tobytes()
    assert np.signbit(summed[uniq.tolist().index(-1)]).sum() == 0


def test_low_precision_tables_step_in_float32_and_round_once(tmp_path):
    import ml_dtypes

    store = Store(str(tmp_path / "db"))
    store.create_table(TableConfig("t", DIM, dtype="bfloat16", optimizer=OptimizerConfig("sgd", lr=0.5)))
    before = store.lookup("t", [3]).weights.astype(np.float32)
    store.apply_gradients("t", [3, 3], np.full((2, DIM), 0.25, np.float32))
    after = store.lookup("t", [3]).weights
    assert after.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(after, (before - 0.25).astype(ml_dtypes.bfloat16))
    store.close()


@pytest.mark.parametrize("lr, beta1, beta2", [(0.01, 0.9, 0.999), (0.5, 0.0, 0.99), (1e-3, 0.99, 0.99999),
                                             (0.1, 0.0, 0.0)])
def test_the_bias_correction_table_holds_the_hosts_values_for_every_step_count(lr, beta1, beta2):
    """The GPU's Adam steps read this table by step count (the last row for every later count):
    each entry must be what the host's Adam step computes for that count, and the last one what
    it computes for any count after."""
    from kvstore.optimizers import bias_correction_table, bias_corrections

    config = OptimizerConfig(name="adam", lr=lr, beta1=beta1, beta2=beta2)
    table = bias_correction_table(config)
    steps = np.concatenate([np.arange(1, min(len(table), 50_000) + 5_000),
                            np.random.default_rng(0).integers(1, 2 ** 32 - 1, 10_000)])
    step_size, bias2_sqrt = bias_corrections(config, steps)
    at = np.minimum(steps, len(table) - 1)
    np.testing.assert_array_equal(table[at, 0], step_size)
    np.testing.assert_array_equal(table[at, 1], bias2_sqrt)
    assert len(table) == 2 or (table[-2] != table[-1]).any()     # no longer than it must be


def test_no_bias_correction_table_for_a_beta_too_near_one():
    from kvstore.optimizers import MAX_BIAS_STEPS, bias_correction_table

    config = OptimizerConfig(name="adam", beta2=1 - 1e-7)
    assert bias_correction_table(config) is None
    assert len(bias_correction_table(OptimizerConfig(name="adam", beta2=0.99999))) <= MAX_BIAS_STEPS
