"""The sweeper beside live traffic: no row written after the sweep chose it is lost, the
background thread keeps a table under its limit while writes go on, triggers fire, and
the rate limit paces a sweep."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kvstore import EvictionConfig, RowNotFound, Store, SweeperConfig
from kvstore.eviction.sweeper import RateLimiter

from .conftest import table_config
from .test_eviction_metadata import FakeClock

T0 = 1_000_000


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_a_row_written_after_the_sweep_chose_it_is_never_lost(data_dir):
    """4 writers rewrite rows that had all expired, while sweeps run back to back in small
    chunks; afterwards every row a writer wrote holds its last written value."""
    clock = FakeClock(T0)
    n, writers = 6000, 4
    sweeper = SweeperConfig(enabled=False, rows_per_second=1e7, chunk_rows=128)
    with Store(data_dir, clock=clock, sweeper=sweeper) as store:
        store.create_table(table_config(rows=1024, ways=8, eviction=EvictionConfig(ttl_seconds=100)))
        store.update("t", np.arange(n), np.zeros((n, 8)))
        store.flush()
        clock.now += 1000                                   # every row has expired
        last: list[dict[int, float]] = [{} for _ in range(writers)]
        stop = threading.Event()

        def write(k: int) -> None:
            rng = np.random.default_rng(k)
            mine = np.arange(k, n // 2, writers)            # disjoint ids per writer; the upper half is never written
            version = 0.0
            while not stop.is_set():
                version += 1
                ids = np.unique(rng.choice(mine, 16))
                store.update("t", ids, np.full((len(ids), 8), version + k / 10))
                last[k].update(dict.fromkeys(ids.tolist(), version + k / 10))

        threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
        for thread in threads:
            thread.start()
        evicted = 0
        try:
            for _ in range(5):
                evicted += store.evict("t")["ttl"]
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        written = {i: v for part in last for i, v in part.items()}
        ids = np.array(sorted(written))
        got = store.lookup("t", ids, on_miss="zeros").weights[:, 0]
        lost = ids[got != np.array([written[i] for i in ids], dtype=np.float32)]
        assert len(lost) == 0, f"{len(lost)} written rows lost, first {lost[:5]}"
        assert evicted >= n - n // 2                        # the sweeps did evict the rows nobody wrote
        assert evicted + len(written) >= n
        with pytest.raises(RowNotFound, match=f"ids: {n - n // 2} ids not found"):   # every one of them
            store.lookup("t", np.arange(n // 2, n), on_miss="error")


def test_the_sweeper_brings_a_table_back_under_max_rows_while_writes_go_on(data_dir):
    """Each round writes rows past the row trigger; the background thread alone (no evict call)
    brings the table back under max_rows before the next round. No timing decides the outcome:
    each round waits for the sweep, with a generous deadline."""
    clock = FakeClock(T0)
    max_rows = 2000
    sweeper = SweeperConfig(rows_per_second=1e6, poll_seconds=0.005, chunk_rows=512)
    with Store(data_dir, clock=clock, sweeper=sweeper) as store:
        store.create_table(table_config(rows=256, ways=8, eviction=EvictionConfig(max_rows=max_rows, headroom=0.5)))
        table = store.table("t")
        for start in range(0, 12_000, 1500):                # 12,000 new rows, 1,500 a round
            clock.now += 1
            store.lookup("t", np.arange(start, start + 1500))
            assert wait_for(lambda: table.eviction.rows <= max_rows, timeout=60), table.eviction.rows
        settled = table.config.eviction.row_trigger          # below it no sweep starts; after one, counts are in
        assert wait_for(lambda: table.eviction.rows <= settled and not table.eviction.sweep_lock.locked(), 60)
        stats = store.stats("t")
        assert stats["evicted_capacity"] >= 12_000 - max_rows
        assert stats["sweeps_by_rows"] >= 1
        store.flush()
        assert store.rocks.count_keys(table.family) == table.eviction.rows


def test_the_interval_trigger_runs_a_sweep_on_the_store_clock(data_dir):
    clock = FakeClock(T0)
    with Store(data_dir, clock=clock, sweeper=SweeperConfig(poll_seconds=0.01)) as store:
        store.create_table(table_config(eviction=EvictionConfig(ttl_seconds=50, interval_seconds=600)))
        store.lookup("t", np.arange(10))
        time.sleep(0.1)
        clock.now += 100                                    # expired, but the interval has not passed
        time.sleep(0.1)
        assert store.stats("t").get("sweeps", 0) == 0
        clock.now += 600
        assert wait_for(lambda: store.stats("t").get("evicted_ttl", 0) == 10)
        assert store.stats("t")["sweeps_by_interval"] == 1


def test_the_disk_bytes_trigger_runs_a_sweep(data_dir):
    clock = FakeClock(T0)
    with Store(data_dir, clock=clock, sweeper=SweeperConfig(poll_seconds=0.01)) as store:
        store.create_table(table_config(eviction=EvictionConfig(ttl_seconds=50, trigger_bytes=1)))
        store.lookup("t", np.arange(10))
        clock.now += 100
        time.sleep(0.1)
        assert store.stats("t").get("sweeps", 0) == 0       # nothing in SST files yet
        store.flush()                                       # memtable -> SST: live bytes > 1
        assert wait_for(lambda: store.stats("t").get("evicted_ttl", 0) == 10)
        assert store.stats("t")["sweeps_by_bytes"] >= 1


def test_a_rate_limited_sweep_takes_rows_over_rate_seconds(data_dir):
    """20,000 rows at 25,000 rows/s take 0.8 s of the limiter's clock (injected: it advances only
    when the limiter sleeps, so the machine's load cannot change the result)."""
    n, rate = 20_000, 25_000.0
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with Store(data_dir, sweeper=SweeperConfig(enabled=False, rows_per_second=rate)) as store:
        store.sweeper.limiter = RateLimiter(rate, monotonic=lambda: now[0], sleep=sleep)
        store.create_table(table_config(dim=4, eviction=EvictionConfig(ttl_seconds=1e6)))
        store.update("t", np.arange(n), np.ones((n, 4)))
        store.flush()
        store.evict("t")
        assert store.stats("t")["sweep_rows_scanned"] == n
    assert now[0] == pytest.approx(n / rate, rel=0.01)


def test_rate_limiter_paces_units_and_forgives_only_a_little_lag():
    now = [0.0]
    slept = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(100.0, slack_s=0.05, monotonic=lambda: now[0], sleep=sleep)
    for _ in range(10):
        limiter.acquire(10)                                 # 100 units at 100/s: one second
    assert now[0] == pytest.approx(1.0)
    now[0] += 5.0                                           # idle for a while: no burst is saved up
    limiter.acquire(50)
    assert now[0] == pytest.approx(6.0 + 0.45)


def test_closing_the_store_stops_a_slow_sweep_at_its_next_chunk(data_dir):
    """A five-second sweep is held inside its rate limiter; close() stops it at the next chunk
    instead of letting it finish (events, not a wall-clock bound)."""
    in_sweep, go_on = threading.Event(), threading.Event()

    def sleep(seconds: float) -> None:       # the limiter holds the sweep here until the test lets it go
        in_sweep.set()
        go_on.wait(60)

    store = Store(data_dir, sweeper=SweeperConfig(rows_per_second=1000, poll_seconds=0.01, chunk_rows=100))
    store.sweeper.limiter = RateLimiter(1000, sleep=sleep)
    store.create_table(table_config(eviction=EvictionConfig(ttl_seconds=1e6, interval_seconds=1e-3)))
    table = store.table("t")
    store.update("t", np.arange(5000), np.ones((5000, 8)))  # a five-second sweep at this rate
    assert in_sweep.wait(60)
    closer = threading.Thread(target=store.close)
    closer.start()
    assert wait_for(lambda: store.sweeper._stop.is_set(), timeout=60)
    go_on.set()
    closer.join(60)
    assert not closer.is_alive()
    assert table.counters["sweep_rows_scanned"] < 5000        # stopped early, not finished
