"""Server-side optimizers: one small class per rule, applied to rows where they live.

Each step reads float32 weights, state and (already de-duplicated, summed)
gradients of n unique rows and updates weights and state in place; the
gradients are only read. Math is float32 whatever the table dtype; the caller
rounds back. `steps` is the per-row step count after this step (Adam's bias
correction). With weight decay, g' = g + weight_decay * w (L2, as torch.optim
does by default).

State layout per row (float32): sgd none; adagrad G[dim]; rowwise_adagrad
G[1]; adam m[dim], v[dim]; partial_rowwise_adam m[dim], v[1].

Every step but rowwise Adagrad's is a few whole-batch NumPy passes with at most one [n, dim]
temporary: per-row factors ([n, 1]) are computed first and broadcast once.
"""
from __future__ import annotations

import functools

import numpy as np

from .config import OptimizerConfig
from .rows import RowLayout
from .validation import sorted_distinct

MAX_BIAS_STEPS = 1 << 22     # the longest table of bias corrections kept (32 MiB): betas nearer 1 compute them


def bias_corrections(config: OptimizerConfig, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Adam's step size lr / (1 - beta1^t) and sqrt(1 - beta2^t) for each step count t (>= 1),
    in float64 and then rounded to float32 (1 - float32(0.999) is off by 1e-5 relative)."""
    return _bias_corrections(config.lr, config.beta1, config.beta2, steps)


def _bias_corrections(lr: float, beta1: float, beta2: float, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = steps.astype(np.float64)
    return (lr / (1 - beta1 ** t)).astype(np.float32), np.sqrt(1 - beta2 ** t).astype(np.float32)


def bias_correction_table(config: OptimizerConfig) -> np.ndarray | None:
    """[T, 2] float32, read-only and shared: row t holds `bias_corrections` at step count t, and
    row T - 1 the value of every later t (1 - beta^t is 1.0 in float64 for both betas from
    beta^t < 2^-54, and the float32 values stop changing earlier). Adam steps read it instead of
    computing two float64 powers a row: on the GPU those cost Adam 9% and partial rowwise Adam 30%
    of their speed, on the host 17% of an Adam step of 4,096 rows (`Optimizer.step` alone); and
    both tiers get the same bits.
    None where T would pass MAX_BIAS_STEPS (a beta within about 9e-6 of 1): steps compute the
    powers then."""
    return _bias_table(config.lr, config.beta1, config.beta2)


@functools.lru_cache(maxsize=16)
def _bias_table(lr: float, beta1: float, beta2: float) -> np.ndarray | None:
    need = 2
    for beta in (beta1, beta2):
        if beta > 0:
            need = max(need, int(np.ceil(-54 / np.log2(beta))) + 2)
    if need > MAX_BIAS_STEPS:
        return None
    steps = np.arange(need, dtype=np.int64)
    steps[0] = 1                                  # no step has count 0
    table = np.stack(_bias_corrections(lr, beta1, beta2, steps), axis=1)
    if not (table[-1, 0] == np.float32(lr) and table[-1, 1] == 1):
        return None                               # not converged (cannot happen for beta < 1): compute them
    differs = np.flatnonzero((table != table[-1]).any(axis=1))
    table = table[:differs[-1] + 2] if len(differs) else table[:2]   # float32 converges first: the rest repeats
    table = table.copy()                          # not a view holding the untrimmed rows
    table.flags.writeable = False
    return table


class Optimizer:
    def __init__(self, config: OptimizerConfig, dim: int):
        self.config = config
        self.dim = dim

    def step(self, weights: np.ndarray, state: np.ndarray, grads: np.ndarray, steps: np.ndarray) -> None:
        raise NotImplementedError

    def _decayed(self, weights: np.ndarray, grads: np.ndarray) -> np.ndarray:
        wd = np.float32(self.config.weight_decay)
        return grads + wd * weights if wd else grads

    def _row_mean_square(self, g: np.ndarray) -> np.ndarray:
        """[n] mean of g^2 per row, without an [n, dim] temporary."""
        return np.einsum("ij,ij->i", g, g) / np.float32(self.dim)


class SGD(Optimizer):
    def step(self, weights, state, grads, steps):
        update = self._decayed(weights, grads) * np.float32(self.config.lr)
        weights -= update


class Adagrad(Optimizer):
    """Per value: state += g'^2; w -= lr * g' / (sqrt(state) + eps), g' = g + weight_decay * w.
    Compiled, one pass per row (`host_kernels.adagrad`), with the bits of NumPy's passes."""

    def step(self, weights, state, grads, steps):
        from .host_kernels import adagrad  # imported here: the compiled loops load on first use

        adagrad(weights, state, grads, self.config.lr, self.config.eps, self.config.weight_decay)


class RowwiseAdagrad(Optimizer):
    """One accumulator per row: the running sum of the row's mean squared gradient. The usual step
    of embedding tables (FBGEMM's default), so it runs compiled, one pass per row
    (`host_kernels.rowwise_adagrad`) instead of NumPy's whole-batch passes."""

    def step(self, weights, state, grads, steps):
        from .host_kernels import rowwise_adagrad  # imported here: the compiled loops load on first use

        rowwise_adagrad(weights, state, grads, self.config.lr, self.config.eps, self.config.weight_decay)


class Adam(Optimizer):
    rowwise_v = False

    def _corrections(self, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        table = bias_correction_table(self.config)
        if table is None:
            return bias_corrections(self.config, steps)
        row = table[np.minimum(steps, len(table) - 1)]
        return row[:, 0], row[:, 1]

    def step(self, weights, state, grads, steps):
        c = self.config
        b1, b2 = np.float32(c.beta1), np.float32(c.beta2)
        g = self._decayed(weights, grads)
        m = state[:, : self.dim]
        v = state[:, self.dim:]
        m *= b1
        m += np.float32(1 - c.beta1) * g
        v *= b2
        if self.rowwise_v:
            v[:, 0] += np.float32(1 - c.beta2) * self._row_mean_square(g)
        else:
            v += np.float32(1 - c.beta2) * np.square(g)
        step_size, bias2_sqrt = (x[:, None] for x in self._corrections(steps))
        denominator = np.sqrt(v) / bias2_sqrt + np.float32(c.eps)      # [n, dim], or [n, 1] rowwise
        update = m * (step_size / denominator) if self.rowwise_v else np.divide(m, denominator, out=denominator)
        if not self.rowwise_v:
            update *= step_size
        weights -= update


class PartialRowwiseAdam(Adam):
    """Adam with the second moment kept per row (mean of g'^2): dim + 1 state values."""

    rowwise_v = True


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD,
    "adagrad": Adagrad,
    "rowwise_adagrad": RowwiseAdagrad,
    "adam": Adam,
    "partial_rowwise_adam": PartialRowwiseAdam,
}


def make_optimizer(config: OptimizerConfig, dim: int) -> Optimizer:
    return OPTIMIZERS[config.name](config, dim)


def step_rows(optimizer: Optimizer, layout: RowLayout, rows: np.ndarray, grads: np.ndarray) -> None:
    """One optimizer step on stored rows ([n, row_bytes], in place): step counts, weights and
    state. float32 weights are stepped where they lie; other dtypes through a float32 copy,
    rounded back once. A step that overflows gives Inf without a warning: the table checks the
    stepped rows and refuses such a step by name (or keeps it, where NaN/Inf are allowed)."""
    header = layout.header(rows)
    header["step"] += 1
    weights = layout.weights(rows)
    with np.errstate(over="ignore", invalid="ignore"):
        if weights.dtype == np.float32:
            optimizer.step(weights, layout.state(rows), grads, header["step"])
            return
        work = weights.astype(np.float32)
        optimizer.step(work, layout.state(rows), grads, header["step"])
        weights[:] = work.astype(layout.dtype)


def sum_duplicates(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique ids (sorted) and the float32 sum of each id's gradient rows, added in request order.

    `host_kernels.sum_by_id` hashes the ids into groups in one pass, sorts only the distinct
    ones and adds each gradient row into its group's in one more pass: no sort of every id
    (`np.unique` with its inverse) and no per-segment overhead (`np.add.reduceat` over many
    short segments, or `np.add.at`, cost 8-10x more than a sparse product, which this replaced).

    Ids already sorted and distinct (what a client that de-duplicated sends: the Train stream's
    collection does) are returned as they are, with `grads` itself when it is float32 and
    contiguous: one comparison pass instead of hashing and copying every row."""
    grads = np.ascontiguousarray(grads, dtype=np.float32)
    if sorted_distinct(ids):
        return ids.copy(), grads         # a fresh ids array, as np.unique's: a change feed may keep it
    from .host_kernels import sum_by_id  # imported here: the compiled loops load on first use

    return sum_by_id(ids, grads)
