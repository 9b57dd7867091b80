"""Store eviction: cold rows leave the store by TTL, capacity, frequency, score and norm.

`rules` holds the rules (one small class each behind `select(meta, now)`),
`admission` the filter in front of row creation, `tracker` what a table keeps
between sweeps, `sweep` one sweep of one table, `sweeper` the background
thread and its rate limit, `archive` the optional archive of evicted rows.
"""
from .rules import TTL, Capacity, EvictionRule, Frequency, NormBelow, RowMeta
from .sweep import REASONS, SweepResult

__all__ = ["REASONS", "TTL", "Capacity", "EvictionRule", "Frequency", "NormBelow", "RowMeta", "SweepResult"]
