"""Timing a subject beside its comparators, and the records a run leaves.

Every comparison runs kvstore and its comparators on the same batches in the same
run, interleaved: repetition r runs the sides in order, r+1 in reverse (ABBA...), so
load from other processes weighs on all sides alike; each figure is the median over
repetitions. Before timing, every side answers the first batch once and the answers
are compared: a comparator that returns other rows stops the run.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SUBJECT, LIMIT, PEER = "subject", "limit", "peer"
CDF_POINTS = 101            # latency quantiles kept per side: 0%, 1%, ..., 100%
MIN_CDF_CALLS = 2           # a single call has no curve: percentiles only


class Disagreement(RuntimeError):
    """A comparator returned other rows than the expected ones: its timing would compare unlike work."""


@dataclass
class Side:
    """One system under comparison. `call` does one batch and returns what it read (or None);
    `check` says how its answer is compared: "rows" (values), "shape" (same bytes, e.g. a
    transport ceiling that sends zeros) or "none"."""
    system: str
    role: str
    call: Callable[[Any], Any]
    check: str = "rows"
    before: Callable[[Any], None] | None = None        # untimed, before each batch


@dataclass
class Record:
    """One measured figure: JSON-lines friendly."""
    suite: str
    case: dict
    system: str
    role: str
    value: float
    unit: str
    reps: list[float] = field(default_factory=list)
    ratio: float | None = None       # kvstore's figure against this one; > 1: kvstore better
    better: str = "higher"
    latency_ms: dict = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict:
        return {"type": "result", **asdict(self)}


def check_agreement(sides: Sequence[Side], batch: Any, expected: np.ndarray, rtol: float = 0.0) -> None:
    """Every side answers `batch`; rows (or shapes) must equal `expected`."""
    for side in sides:
        if side.check == "none":
            continue
        got = np.asarray(side.call(batch))
        if side.check == "shape":
            if got.nbytes != expected.nbytes:
                raise Disagreement(f"{side.system}: returned {got.nbytes} bytes, expected {expected.nbytes}")
            continue
        if got.shape != expected.shape:
            raise Disagreement(f"{side.system}: returned shape {got.shape}, expected {expected.shape}")
        same = np.allclose(got, expected, rtol=rtol, atol=rtol) if rtol else np.array_equal(got, expected)
        if not same:
            bad = int(np.count_nonzero(~np.isclose(got, expected, rtol=rtol, atol=rtol)))
            raise Disagreement(f"{side.system}: {bad} values differ from the expected rows")


@dataclass
class Timing:
    rates: list[float] = field(default_factory=list)       # units per second, one per repetition
    latencies: list[float] = field(default_factory=list)   # seconds per batch, all repetitions

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def interleave(sides: Sequence[Side], batches: Sequence[Any], reps: int,
               units: Callable[[Any], float] = len) -> dict[str, Timing]:
    """Run every side over `batches` `reps` times, order reversed on odd repetitions."""
    timings = {side.system: Timing() for side in sides}
    total = sum(units(b) for b in batches)
    for rep in range(reps):
        for side in sides if rep % 2 == 0 else list(reversed(sides)):
            elapsed = 0.0
            for batch in batches:
                if side.before:
                    side.before(batch)
                start = time.perf_counter()
                side.call(batch)
                spent = time.perf_counter() - start
                elapsed += spent
                timings[side.system].latencies.append(spent)
            timings[side.system].rates.append(total / max(elapsed, 1e-9))
    return timings


def latency_summary(latencies: Sequence[float]) -> dict:
    """Percentiles in ms, and the quantile curve the CDF plot draws."""
    ms = np.asarray(latencies, dtype=np.float64) * 1e3
    if not len(ms):
        return {}
    summary = {"p50": float(np.quantile(ms, 0.5)), "p90": float(np.quantile(ms, 0.9)),
               "p99": float(np.quantile(ms, 0.99)), "count": len(ms)}
    if len(ms) >= MIN_CDF_CALLS:
        summary["cdf"] = [round(float(q), 4) for q in np.quantile(ms, np.linspace(0, 1, CDF_POINTS))]
    return summary


def kvstore_ratio(subject: float, other: float, better: str = "higher") -> float:
    """kvstore against a comparator, > 1 when kvstore is better (faster, or smaller for times and bytes)."""
    if better == "higher":
        return subject / max(other, 1e-12)
    return other / max(subject, 1e-12)


def records_from(suite: str, case: dict, sides: Sequence[Side], timings: dict[str, Timing], unit: str,
                 notes: dict[str, str] | None = None) -> list[Record]:
    """One record per side; comparators carry kvstore's ratio to them (kvstore is the first side)."""
    subject = timings[sides[0].system].median
    records = []
    for side in sides:
        timing = timings[side.system]
        ratio = None if side.role == SUBJECT else kvstore_ratio(subject, timing.median)
        records.append(Record(suite, case, side.system, side.role, timing.median, unit, timing.rates, ratio,
                              latency_ms=latency_summary(timing.latencies), note=(notes or {}).get(side.system, "")))
    return records


def compare(suite: str, case: dict, sides: Sequence[Side], batches: Sequence[Any], reps: int,
            expected: np.ndarray | None = None, unit: str = "rows/s", rtol: float = 0.0,
            units: Callable[[Any], float] = len, notes: Callable[[], dict] | None = None) -> list[Record]:
    """Check agreement on the first batch, then time all sides interleaved."""
    if expected is not None:
        check_agreement(sides, batches[0], expected, rtol)
    timings = interleave(sides, batches, reps, units)
    return records_from(suite, case, sides, timings, unit, notes() if notes else None)
