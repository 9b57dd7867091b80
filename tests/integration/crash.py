"""Kill -9 cycles against a real server: write, SIGKILL at a random moment, restart, verify.

One client thread writes a table of `ROWS` ids: `update` (weights base(v), state zeros: version
(v, 0)) and `apply_gradients` with gradients of one (version (v, k) -> (v, k + 1)). Adagrad with
gradients of one makes every version checkable from the row alone: state = k everywhere and
weights = base(v) - lr * H(k), H(k) = sum_{j<=k} 1 / sqrt(j). A row whose weights and state come
from two writes matches no version: it is torn.

The promise checked after each restart, per mode (`MODES`):
- write_through: each row holds its last acknowledged version, or the one in flight at the kill;
- write_back (flush_seconds = FLUSH_SECONDS): each row holds one of its acknowledged versions
  (or the one in flight), none older than the newest acknowledged FLUSH_SECONDS + SLACK_SECONDS
  before the kill;
- none (durability none, write-back table): each row holds one of its versions or none; the
  table itself survives. In every mode no row is torn.
Used by tests/integration/test_crash.py (a few cycles) and bench/crash_cycles.py (many).
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from kvstore_client import KVStoreClient

ROWS = 256
DIM = 4
BATCH = 32
LR = 0.01
FLUSH_SECONDS = 0.1
SLACK_SECONDS = 1.0          # one flush's duration on a loaded machine, and the flusher's poll
MODES = {                    # mode -> (server flags, table write policy)
    "write_through": ((), "write_through"),
    "write_back": ((), "write_back"),
    "none": (("--rocksdb-durability", "none"), "write_back"),
}
TABLE = "crash"


def base(ids: np.ndarray, version: int) -> np.ndarray:
    """Weights of version (v, 0): small and exact in float32 (v/16), so float32 rounding over a few
    hundred steps stays far below the gap between two versions (1/16) or two step counts."""
    out = np.zeros((len(ids), DIM), dtype=np.float32)
    out[:, 0] = version / 16
    out[:, 1] = ids % 1000
    out[:, 2] = -version / 16
    return out


def harmonic(k: np.ndarray) -> np.ndarray:
    """H(k) = sum_{j=1..k} 1/sqrt(j), for each k (k up to a few thousand)."""
    table = np.concatenate([[0.0], np.cumsum(1.0 / np.sqrt(np.arange(1, int(k.max(initial=0)) + 1)))])
    return table[k]


@dataclass
class RowHistory:
    """Acknowledged versions (v, k) of one row with their reply times, and the one in flight."""

    acked: list[tuple[int, int, float]] = field(default_factory=list)
    in_flight: tuple[int, int] | None = None

    def current(self) -> tuple[int, int] | None:
        return self.acked[-1][:2] if self.acked else None


@dataclass
class Tally:
    cycles: int = 0
    verified: int = 0            # acknowledged writes whose row was checked against the promise
    lost: int = 0                # rows outside the promise (must stay 0)
    torn: int = 0
    problems: list[str] = field(default_factory=list)


class Writer(threading.Thread):
    """Writes until told to stop or the server dies; records every acknowledged version."""

    def __init__(self, address: str, history: dict[int, RowHistory], seed: int):
        super().__init__(daemon=True)
        self.address = address
        self.history = history
        self.rng = np.random.default_rng(seed)
        self.stop = threading.Event()
        self.version = 1 + max((h.current() or (0, 0))[0] for h in history.values())
        self.acked = 0

    def run(self) -> None:
        try:
            with KVStoreClient(self.address, timeout=5.0) as client:
                while not self.stop.is_set():
                    self._one(client)
        except Exception:  # noqa: BLE001 - the server was killed under us: expected
            pass

    def _one(self, client: KVStoreClient) -> None:
        ids = np.sort(self.rng.choice(ROWS, BATCH, replace=False)).astype(np.int64)
        rows = [self.history[int(i)] for i in ids]
        step = all(r.current() is not None for r in rows) and self.rng.random() < 0.5
        if step:
            for r in rows:
                v, k = r.current()
                r.in_flight = (v, k + 1)
            client.apply_gradients(TABLE, ids, np.ones((BATCH, DIM), np.float32))
        else:
            self.version += 1
            for r in rows:
                r.in_flight = (self.version, 0)
            client.update(TABLE, ids, base(ids, self.version), np.zeros((BATCH, DIM), np.float32))
        now = time.monotonic()
        for r in rows:
            r.acked.append((*r.in_flight, now))
            r.in_flight = None
        self.acked += BATCH


def decode(ids: np.ndarray, weights: np.ndarray, state: np.ndarray) -> list[tuple[int, int] | None | str]:
    """The version (v, k) each row holds, None for no row, "torn" for a row matching no version."""
    k = np.rint(state[:, 0]).astype(np.int64)
    v = np.rint((weights[:, 0] + LR * harmonic(np.maximum(k, 0))) * 16).astype(np.int64)
    out: list = []
    for i in range(len(ids)):
        if not weights[i].any() and not state[i].any():
            out.append(None)
            continue
        expect = base(ids[i:i + 1], int(v[i]))[0] - LR * harmonic(np.array([max(k[i], 0)]))[0]
        ok = k[i] >= 0 and np.allclose(state[i], k[i], atol=1e-3) and np.allclose(weights[i], expect, atol=2e-4)
        out.append((int(v[i]), int(k[i])) if ok else "torn")
    return out


def allowed(mode: str, row: RowHistory, killed_at: float) -> tuple[set, bool]:
    """Versions the promise allows after a kill at `killed_at`, and whether no row is allowed."""
    versions = [(v, k) for v, k, _ in row.acked]
    in_flight = {row.in_flight} if row.in_flight else set()
    if mode == "write_through":
        return set(versions[-1:]) | in_flight, not versions
    if mode == "none":
        return set(versions) | in_flight, True
    durable_before = killed_at - FLUSH_SECONDS - SLACK_SECONDS
    older = [i for i, (_, _, t) in enumerate(row.acked) if t <= durable_before]
    floor = older[-1] if older else 0
    return set(versions[floor:]) | in_flight, not older


def verify(client: KVStoreClient, mode: str, history: dict[int, RowHistory], killed_at: float,
           tally: Tally) -> None:
    """Check every row against the promise, then make what it holds its only acknowledged version."""
    ids = np.arange(ROWS, dtype=np.int64)
    weights, state = client.lookup(TABLE, ids, on_miss="zeros", with_state=True)
    for i, found in zip(ids, decode(ids, weights, state), strict=True):
        row = history[int(i)]
        versions, may_be_absent = allowed(mode, row, killed_at)
        tally.verified += len(row.acked)
        if found == "torn":
            tally.torn += 1
            tally.problems.append(f"row {i}: torn (weights {weights[i]}, state {state[i]})")
        elif (found is None and not may_be_absent) or (found is not None and found not in versions):
            tally.lost += 1
            tally.problems.append(f"row {i}: holds {found}, promise allows {sorted(versions)} "
                                  f"(acked {[(v, k) for v, k, _ in row.acked][-4:]})")
        history[int(i)] = RowHistory([(*found, 0.0)] if isinstance(found, tuple) else [])


def run_cycles(start: Callable[[tuple[str, ...]], object], mode: str, cycles: int, seed: int = 0,
               run_seconds: tuple[float, float] = (0.1, 0.5)) -> Tally:
    """`start(flags)` starts a server on one data directory (the same each call) and returns an
    object with `.address` and `.process` (a Popen). Each cycle: write, SIGKILL, restart, verify."""
    flags, write = MODES[mode]
    pick = random.Random(seed)
    tally = Tally()
    server = start(flags)
    with KVStoreClient(server.address, timeout=30.0) as client:
        client.create_table(TABLE, DIM, optimizer={"name": "adagrad", "lr": LR, "eps": 1e-30},
                            cache={"rows": 128, "ways": 32, "write": write, "flush_seconds": FLUSH_SECONDS})
    history = {i: RowHistory() for i in range(ROWS)}
    for cycle in range(cycles):
        writer = Writer(server.address, history, seed * 1000 + cycle)
        writer.start()
        time.sleep(pick.uniform(*run_seconds))
        killed_at = time.monotonic()
        server.process.kill()
        server.process.wait()
        writer.stop.set()
        writer.join()
        server = start(flags)
        with KVStoreClient(server.address, timeout=30.0) as client:
            if TABLE not in client.list_tables():
                tally.lost += ROWS
                tally.problems.append(f"cycle {cycle}: table {TABLE!r} is gone after the kill")
                break
            verify(client, mode, history, killed_at, tally)
        tally.cycles += 1
    return tally
