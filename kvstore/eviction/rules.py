"""Store eviction rules: each decides, from row metadata, which rows leave the store.

Every rule answers `select(meta, now) -> mask` over a batch of rows. Rules of
scope "row" judge each row on its own and run chunk by chunk as the sweep
scans; rules of scope "table" (capacity) need the whole table and run once,
after the scan, over the metadata it gathered. `adjust` lets a rule change a
row's header as the sweep passes (decay); the sweep writes changed headers back.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import EvictionConfig
from ..rows import HEADER, MAX_COUNT, RowLayout, decode_scores


@dataclass
class RowMeta:
    """Metadata of a batch of rows, as the eviction rules read it."""

    ids: np.ndarray            # [n] int64
    last_access: np.ndarray    # [n] uint32 unix seconds
    count: np.ndarray          # [n] uint32 accesses (decayed)
    score: np.ndarray          # [n] float32 client score (0 where none was sent)
    norm: np.ndarray | None = None   # [n] float32 L2 norm of the weights (None: not gathered)
    total: int | None = None   # rows in the table when meta covers all of it (table-scope rules)

    @classmethod
    def of(cls, layout: RowLayout, ids: np.ndarray, rows: np.ndarray, with_norm: bool = False) -> RowMeta:
        header = layout.header(rows)
        norm = None
        if with_norm:
            weights = layout.weights(rows).astype(np.float32)
            norm = np.sqrt(np.einsum("ij,ij->i", weights, weights))
        return cls(ids, header["last_access"].copy(), header["count"].copy(),
                   decode_scores(header["score"]), norm)

    @classmethod
    def empty(cls) -> RowMeta:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.uint32), np.zeros(0, np.uint32), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index) -> RowMeta:
        return RowMeta(self.ids[index], self.last_access[index], self.count[index], self.score[index],
                       None if self.norm is None else self.norm[index])

    @classmethod
    def concat(cls, parts: list[RowMeta]) -> RowMeta:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("ids", "last_access", "count", "score")))


class EvictionRule:
    """Base: a rule with a reason (the label its evictions are counted under)."""

    reason = "rule"
    scope = "row"          # "row": judged chunk by chunk; "table": once over the whole table
    needs_norm = False

    def select(self, meta: RowMeta, now: float) -> np.ndarray:
        raise NotImplementedError

    def adjust(self, meta: RowMeta) -> np.ndarray:
        """Change `meta` in place before selection; returns the rows whose header changed."""
        return np.zeros(len(meta), dtype=bool)


class TTL(EvictionRule):
    """Rows not accessed for `seconds` leave the store."""

    reason = "ttl"

    def __init__(self, seconds: float):
        self.seconds = seconds

    def select(self, meta: RowMeta, now: float) -> np.ndarray:
        return meta.last_access.astype(np.float64) < now - self.seconds


class NormBelow(EvictionRule):
    """Rows whose weights have an L2 norm below `threshold` carry little signal and leave."""

    reason = "norm"
    needs_norm = True

    def __init__(self, threshold: float):
        self.threshold = threshold

    def select(self, meta: RowMeta, now: float) -> np.ndarray:
        return meta.norm < self.threshold


class Frequency(EvictionRule):
    """Access counts lose `rate` of their value at every sweep; rows under `threshold` leave."""

    reason = "frequency"

    def __init__(self, rate: float, threshold: int):
        self.keep = 1.0 - rate
        self.threshold = threshold

    def adjust(self, meta: RowMeta) -> np.ndarray:
        if self.keep == 1.0:
            return np.zeros(len(meta), dtype=bool)
        decayed = np.floor(meta.count * self.keep).astype(np.uint32)
        changed = decayed != meta.count
        meta.count[:] = decayed
        return changed

    def select(self, meta: RowMeta, now: float) -> np.ndarray:
        return meta.count < self.threshold


class Capacity(EvictionRule):
    """The worst of `samples` random rows leaves, pick after pick, until at most `target` rows
    remain (approximate LRU, LFU or lowest score, as Redis samples keys). `target` is the low
    watermark under `max_rows`, so writes between sweeps have room; the sweeper runs the rule
    before a table reaches `max_rows`."""

    scope = "table"

    def __init__(self, max_rows: int, target: int, policy: str = "lru", samples: int = 16, seed: int = 0):
        self.max_rows = max_rows
        self.target = target
        self.policy = policy
        self.samples = samples
        self.reason = "score" if policy == "score" else "capacity"
        self.rng = np.random.default_rng(seed)

    def badness_key(self, meta: RowMeta) -> np.ndarray:
        """Smaller key leaves first."""
        if self.policy == "score":
            return meta.score
        if self.policy == "lfu":   # fewest accesses, ties broken by age
            return (np.minimum(meta.count, 1 << 30).astype(np.int64) << 32) | meta.last_access
        return meta.last_access

    def select(self, meta: RowMeta, now: float) -> np.ndarray:
        total = len(meta) if meta.total is None else meta.total
        mask = np.zeros(len(meta), dtype=bool)
        if total > self.target:
            mask[sample_worst(self.badness_key(meta), total - self.target, self.samples, self.rng)] = True
        return mask


def sample_worst(key: np.ndarray, k: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of up to `k` distinct rows, each the smallest key among `samples` random live rows.
    Vectorized by rounds: every round draws one sample group per row still needed."""
    alive = np.ones(len(key), dtype=bool)
    chosen = []
    need = min(k, len(key))
    while need > 0:
        pool = np.flatnonzero(alive)
        if len(pool) <= need:
            chosen.append(pool)
            break
        groups = pool[rng.integers(0, len(pool), size=(need, samples))]
        worst = np.unique(groups[np.arange(need), key[groups].argmin(axis=1)])
        chosen.append(worst)
        alive[worst] = False
        need -= len(worst)
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)


def build_rules(config: EvictionConfig) -> list[EvictionRule]:
    """The rules a table's config switches on, in the order reasons are attributed."""
    rules: list[EvictionRule] = []
    if config.ttl_seconds:
        rules.append(TTL(config.ttl_seconds))
    if config.min_norm:
        rules.append(NormBelow(config.min_norm))
    if config.count_threshold or config.decay_rate:
        rules.append(Frequency(config.decay_rate, config.count_threshold))
    if config.max_rows:
        rules.append(Capacity(config.max_rows, config.target_rows, config.capacity_policy, config.samples))
    return rules


COUNT_WORD = HEADER.fields["count"][1] // 4         # header words, as uint32 (last_access is the next)
assert HEADER.fields["last_access"][1] // 4 == COUNT_WORD + 1


def touch_headers(rows: np.ndarray, slots: np.ndarray, now: int) -> None:
    """Record an access in the headers of rows `slots` of a C-contiguous [n, row_bytes] uint8
    array: count + 1 (saturating), last_access = now; duplicates count once. Flat take/put on
    uint32 words: several times faster than indexing a structured header view."""
    if not rows.flags.c_contiguous:
        raise ValueError("rows: touch_headers writes through a flat view; give it C-contiguous rows")
    words = rows.view(np.uint32).reshape(-1)
    at = slots * (rows.shape[1] // 4) + COUNT_WORD
    words.put(at, np.minimum(words.take(at), MAX_COUNT) + np.uint32(1))
    words.put(at + 1, np.uint32(now))
