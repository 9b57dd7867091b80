"""Server-side optimizers: one small class per rule, applied to rows where they live.

Each step reads float32 weights, state and (already de-duplicated, summed)
gradients of n unique rows and updates weights and state in place. Math is
float32 whatever the table dtype; the caller rounds back. `steps` is the
per-row step count after this step (Adam's bias correction). With weight
decay, g' = g + weight_decay * w (L2, as torch.optim does by default).

State layout per row (float32): sgd none; adagrad G[dim]; rowwise_adagrad
G[1]; adam m[dim], v[dim]; partial_rowwise_adam m[dim], v[1].
"""
from __future__ import annotations

import numpy as np

from .config import OptimizerConfig


class Optimizer:
    def __init__(self, config: OptimizerConfig, dim: int):
        self.config = config
        self.dim = dim

    def step(self, weights: np.ndarray, state: np.ndarray, grads: np.ndarray, steps: np.ndarray) -> None:
        raise NotImplementedError

    def _decayed(self, weights: np.ndarray, grads: np.ndarray) -> np.ndarray:
        wd = np.float32(self.config.weight_decay)
        return grads + wd * weights if wd else grads


class SGD(Optimizer):
    def step(self, weights, state, grads, steps):
        weights -= np.float32(self.config.lr) * self._decayed(weights, grads)


class Adagrad(Optimizer):
    def step(self, weights, state, grads, steps):
        g = self._decayed(weights, grads)
        state += g * g
        weights -= np.float32(self.config.lr) * g / (np.sqrt(state) + np.float32(self.config.eps))


class RowwiseAdagrad(Optimizer):
    """One accumulator per row: the running sum of the row's mean squared gradient."""

    def step(self, weights, state, grads, steps):
        g = self._decayed(weights, grads)
        state[:, 0] += (g * g).mean(axis=1)
        weights -= np.float32(self.config.lr) * g / (np.sqrt(state[:, :1]) + np.float32(self.config.eps))


class Adam(Optimizer):
    rowwise_v = False

    def step(self, weights, state, grads, steps):
        c = self.config
        # coefficients in float64 first: 1 - float32(0.999) is off by 1e-5 relative
        b1, b2 = np.float32(c.beta1), np.float32(c.beta2)
        g = self._decayed(weights, grads)
        m = state[:, : self.dim]
        v = state[:, self.dim:]
        m *= b1
        m += np.float32(1 - c.beta1) * g
        v *= b2
        v += np.float32(1 - c.beta2) * ((g * g).mean(axis=1, keepdims=True) if self.rowwise_v else g * g)
        t = steps.astype(np.float64)[:, None]
        step_size = (c.lr / (1 - c.beta1 ** t)).astype(np.float32)
        bias2_sqrt = np.sqrt(1 - c.beta2 ** t).astype(np.float32)
        weights -= step_size * m / (np.sqrt(v) / bias2_sqrt + np.float32(c.eps))


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


def sum_duplicates(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique ids (sorted) and the float32 sum of each id's gradient rows."""
    uniq, inverse = np.unique(ids, return_inverse=True)
    grads = grads.astype(np.float32, copy=False)
    if len(uniq) == len(ids):
        out = np.empty_like(grads)
        out[inverse] = grads
        return uniq, out
    order = np.argsort(inverse, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
    return uniq, np.add.reduceat(grads[order], starts, axis=0)
