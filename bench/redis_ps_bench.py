"""A training step through kvstore against a Redis parameter server doing the same maths. Not a test.

Both sides run the same step, batch by batch interleaved, on the same Zipf ids and
gradients (rowwise Adagrad, dim 128):

- Redis: the usual Redis-as-parameter-server loop. Each row (weights and its
  accumulator, float32) is one key; the client de-duplicates the ids, MGETs the
  rows, sums duplicate gradients, steps them in NumPy and MSETs them back.
- kvstore (plain): `KVStoreClient.lookup` of the unique ids, then
  `apply_gradients` with the raw ids and gradients (the server sums and steps).
- kvstore (summed): as plain, with the duplicate gradients summed in the client first, by
  the same function as the Redis loop's, so only unique rows cross the wire (the server's
  own sum of the same rows gives the same bits).
- kvstore (stream): the same step on one `TrainingStream` (the `Train` RPC): the
  lookup, then the gradients, and the step ends when the server has applied them.

Two more sides run the loop a trainer runs, where a step's rows are read before its gradients
exist, so a step's update can travel with the next step's read (one round trip a step):
- Redis (pipelined): one pipeline per step, the MSET of the previous step's stepped rows,
  then the MGET of this step's (a second Redis database, loaded with the same rows).
- kvstore (pipelined): one `Train` message per step, the previous step's summed gradients
  (applied first), then the lookup of this step's unique ids.
The last step's update goes in a final round trip, timed with the rest. Every side ends with
the same rows.

Debian's redis-server is started on loopback (no persistence); kvstore-server too.
Every row is loaded into both before timing. By default kvstore's cache holds every
row; `--cache-rows N` gives its tables a smaller cache, so part of each step's rows come
from RocksDB (the hit rate of the timed lookups is printed; Redis keeps every row in
memory either way). Ratio = Redis time / kvstore time.

    python bench/redis_ps_bench.py [--rows 1000000] [--batches 4096,65536] [--cache-rows N] [--same-host]
        [--flush-seconds S] [--redis-aof everysec]

kvstore's tables write their dirty rows back to RocksDB every `cache.flush_seconds` (1 s by
default), while Redis by default here keeps nothing on disk. `--flush-seconds 600` takes most
of that write-back out of the timed steps; `--redis-aof everysec` gives Redis the persistence
users would turn on (an append-only file fsynced each second).

`--same-host`: the kvstore client moves ids, rows and gradients through shared memory
(docs/same-host.md), as a trainer next to its server would; Redis stays on its TCP socket.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import redis
from kvstore_client import KVStoreClient
from kvstore_client.training_stream import TrainingStream
from store_bench import IdSampler

from kvstore import CacheConfig
from kvstore.optimizers import sum_duplicates

LR, EPS, TABLE = 0.01, 1e-8, "ps"
SIDES = ("plain", "summed", "stream", "pipelined")     # the kvstore tables, one per way of stepping


def start_redis(work: str, aof: str = "no") -> tuple[subprocess.Popen, redis.Redis]:
    """redis-server on a free loopback TCP port (as kvstore-server listens): no persistence, or
    an append-only file in `work` fsynced as `aof` says."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    persistence = ["--appendonly", "no"] if aof == "no" else ["--appendonly", "yes", "--appendfsync", aof,
                                                             "--dir", work]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence],
                            stdout=subprocess.DEVNULL)
    db = redis.Redis(port=port)
    for _ in range(200):
        try:
            db.ping()
            return proc, db
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


class RedisPS:
    def __init__(self, db: redis.Redis, dim: int):
        self.db, self.dim = db, dim

    @staticmethod
    def keys(ids: np.ndarray) -> list[bytes]:
        return ids.astype("<i8").view("V8").tolist()

    def load(self, weights: np.ndarray, batch: int = 20000) -> None:
        for lo in range(0, len(weights), batch):
            rows = np.zeros((min(batch, len(weights) - lo), self.dim + 1), np.float32)
            rows[:, :self.dim] = weights[lo:lo + len(rows)]
            self.db.mset(self.entries(self.keys(np.arange(lo, lo + len(rows))), rows))

    def step(self, ids: np.ndarray, grads: np.ndarray) -> np.ndarray:
        uniq, summed = sum_duplicates(ids, grads)
        keys = self.keys(uniq)
        rows = self.stepped(self.db.mget(keys), summed)
        self.db.mset(self.entries(keys, rows))
        return rows[:, :self.dim]

    def stepped(self, values: list[bytes], summed: np.ndarray) -> np.ndarray:
        """The rows of `values` (weights, then the accumulator) after one rowwise Adagrad step."""
        rows = self.rows_of(values, self.dim).copy()
        weights, acc = rows[:, :self.dim], rows[:, self.dim:]
        acc[:, 0] += (summed * summed).mean(axis=1)
        weights -= np.float32(LR) * summed / (np.sqrt(acc) + np.float32(EPS))
        return rows

    @staticmethod
    def rows_of(values: list[bytes], dim: int) -> np.ndarray:
        """The rows (weights, then the accumulator) that MGET `values` hold, read-only."""
        return np.frombuffer(b"".join(values), np.float32).reshape(len(values), dim + 1)

    @staticmethod
    def entries(keys: list[bytes], rows: np.ndarray) -> dict[bytes, bytes]:
        """An MSET's key -> value mapping, one binary value per row."""
        return dict(zip(keys, rows.view(f"V{rows[:1].nbytes}").ravel().tolist(), strict=True))


class RedisPipelinedPS(RedisPS):
    """The Redis loop with each step's MSET sent in the next step's pipeline, before its MGET."""

    def __init__(self, db: redis.Redis, dim: int):
        super().__init__(db, dim)
        self.unwritten: dict | None = None

    def step(self, ids: np.ndarray, grads: np.ndarray) -> np.ndarray:
        uniq, summed = sum_duplicates(ids, grads)
        keys = self.keys(uniq)
        pipe = self.db.pipeline(transaction=False)
        if self.unwritten:
            pipe.mset(self.unwritten)
        pipe.mget(keys)
        rows = self.stepped(pipe.execute()[-1], summed)
        self.unwritten = self.entries(keys, rows)
        return rows[:, :self.dim]

    def finish(self) -> None:
        if self.unwritten:
            self.db.mset(self.unwritten)
            self.unwritten = None


class KVStorePipelined:
    """The kvstore loop with each step's summed gradients sent with the next step's lookup."""

    def __init__(self, stream: TrainingStream, table: str):
        self.stream, self.table = stream, table
        self.unsent: tuple[np.ndarray, np.ndarray] | None = None

    def step(self, ids: np.ndarray, grads: np.ndarray) -> None:
        uniq, summed = sum_duplicates(ids, grads)
        gradients = {self.table: self.unsent} if self.unsent is not None else None
        self.stream.send(gradients=gradients, lookups={self.table: uniq}).result()
        self.unsent = (uniq, summed)

    def finish(self) -> None:
        if self.unsent is not None:
            self.stream.send(gradients={self.table: self.unsent}).result()
            self.unsent = None


def kvstore_plain(client: KVStoreClient, ids: np.ndarray, grads: np.ndarray) -> None:
    client.lookup(f"{TABLE}_plain", np.unique(ids))
    client.apply_gradients(f"{TABLE}_plain", ids, grads)


def kvstore_summed(client: KVStoreClient, ids: np.ndarray, grads: np.ndarray) -> None:
    uniq, summed = sum_duplicates(ids, grads)
    client.lookup(f"{TABLE}_summed", uniq)
    client.apply_gradients(f"{TABLE}_summed", uniq, summed)


def kvstore_stream(stream: TrainingStream, ids: np.ndarray, grads: np.ndarray) -> None:
    stream.send(lookups={f"{TABLE}_stream": np.unique(ids)}).result()
    stream.send(gradients={f"{TABLE}_stream": (ids, grads)})
    stream.flush()         # the step's time includes its gradients being applied


def redis_rows(db: redis.Redis, ids: np.ndarray, dim: int) -> np.ndarray:
    return RedisPS.rows_of(db.mget(RedisPS.keys(ids)), dim)[:, :dim]


def check_same_rows(dbs: list[redis.Redis], client: KVStoreClient, ids: np.ndarray, dim: int) -> float:
    """Largest difference between the first Redis database's rows and those of the other Redis
    databases and of each kvstore table (all applied the same steps)."""
    rows = redis_rows(dbs[0], ids, dim)
    others = [redis_rows(db, ids, dim) for db in dbs[1:]] + [client.lookup(f"{TABLE}_{side}", ids) for side in SIDES]
    return max(float(np.abs(other - rows).max()) for other in others)


def settle(client: KVStoreClient, tables: list[str], timeout: float = 120.0) -> None:
    """Wait until the loaded rows are written back (no dirty cached row left), so the timed
    steps do not share the machine with the write-back of the load."""
    deadline = time.monotonic() + timeout
    while any(client.stats(t).get("cache_dirty_rows", 0) for t in tables) and time.monotonic() < deadline:
        time.sleep(0.2)


def hit_rate(before: dict, after: dict) -> float:
    """Share of the lookups between two `stats` that found their row in the cache."""
    def change(name: str) -> float:            # counters appear once they first count
        return after.get(name, 0.0) - before.get(name, 0.0)

    hits = change("cache_hits")
    return hits / max(1.0, hits + change("cache_misses"))


def bench(sides: dict, batches: list, rounds: int, finish: dict | None = None) -> dict[str, float]:
    """Seconds per step of each side, the same batches in turns; `finish` {side: call} ends a
    pipelined side's run (its last update), timed as part of that side."""
    seconds = dict.fromkeys(sides, 0.0)
    for _ in range(rounds):
        for ids, grads in batches:
            for name, run in sides.items():
                start = time.perf_counter()
                run(ids, grads)
                seconds[name] += time.perf_counter() - start
    for name, call in (finish or {}).items():
        start = time.perf_counter()
        call()
        seconds[name] += time.perf_counter() - start
    return {name: s / (rounds * len(batches)) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batches", default="4096,65536")
    parser.add_argument("--count", type=int, default=8, help="distinct batches per size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-rows", type=int, default=0,
                        help="cache slots of each kvstore table (default: twice the rows, all cached)")
    parser.add_argument("--same-host", action="store_true", help="kvstore through shared memory (same host)")
    parser.add_argument("--flush-seconds", type=float, default=None,
                        help="write-back interval of the kvstore tables (cache.flush_seconds; default: the default)")
    parser.add_argument("--redis-aof", choices=("no", "everysec", "always"), default="no",
                        help="Redis's append-only file: no (no persistence; the default), or fsynced everysec/always")
    args = parser.parse_args()
    print(f"redis ps bench: rows={args.rows:,} dim={args.dim} rowwise_adagrad zipf 1.05; {os.cpu_count()} CPUs, "
          f"kvstore {'through shared memory' if args.same_host else 'over loopback TCP'}, "
          f"kvstore write-back every {args.flush_seconds or CacheConfig().flush_seconds:g} s, "
          f"Redis append-only file: {args.redis_aof}; {time.strftime('%Y-%m-%d %H:%M')}")
    work = tempfile.mkdtemp(prefix="ps-bench-")
    redis_proc, db = start_redis(work, args.redis_aof)
    server = subprocess.Popen([sys.executable, "-m", "kvstore_server", "--data-dir", os.path.join(work, "kv"),
                               "--port", "0"], stdout=subprocess.PIPE, text=True)
    address = server.stdout.readline().strip().rsplit(" ", 1)[-1]
    try:
        weights = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32)
        ps = RedisPS(db, args.dim)
        ps.load(weights)
        db_pipelined = redis.Redis(port=db.connection_pool.connection_kwargs["port"], db=1)
        ps_pipelined = RedisPipelinedPS(db_pipelined, args.dim)
        ps_pipelined.load(weights)
        with KVStoreClient(address, timeout=300, same_host=args.same_host) as client:
            cache_rows = args.cache_rows or 32 * int(2 ** np.ceil(np.log2(max(1, 2 * args.rows // 32))))
            cache = {"rows": cache_rows}
            if args.flush_seconds:
                cache["flush_seconds"] = args.flush_seconds
            for side in SIDES:
                client.create_table(f"{TABLE}_{side}", args.dim, cache=cache,
                                    optimizer={"name": "rowwise_adagrad", "lr": LR, "eps": EPS})
                for lo in range(0, args.rows, 50000):
                    client.update(f"{TABLE}_{side}", np.arange(lo, min(lo + 50000, args.rows)), weights[lo:lo + 50000])
            settle(client, [f"{TABLE}_{side}" for side in SIDES])
            stream, pipelined_stream = TrainingStream(client), TrainingStream(client)
            pipelined = KVStorePipelined(pipelined_stream, f"{TABLE}_pipelined")
            sides = {"redis": ps.step, "kvstore plain": lambda i, g: kvstore_plain(client, i, g),
                     "kvstore summed": lambda i, g: kvstore_summed(client, i, g),
                     "kvstore stream": lambda i, g: kvstore_stream(stream, i, g),
                     "redis pipelined": ps_pipelined.step, "kvstore pipelined": pipelined.step}
            finish = {"redis pipelined": ps_pipelined.finish, "kvstore pipelined": pipelined.finish}
            sampler = IdSampler(args.rows, 1.05, seed=1)
            print(f"{'batch':>8} {'redis ms':>9} {'plain ms':>9} {'summed ms':>10} {'stream ms':>10} "
                  f"{'plain/redis':>12} {'summed/redis':>13} {'stream/redis':>13} {'kvstore hits':>13} "
                  f"{'redis pipe ms':>14} {'kv pipe ms':>11} {'pipelined: kv/redis':>20}")
            for batch in (int(b) for b in args.batches.split(",")):
                rng = np.random.default_rng(batch)
                batches = [(ids, rng.standard_normal((batch, args.dim), dtype=np.float32))
                           for ids in sampler.batches("zipf", batch, args.count)]
                bench(sides, batches[:2], 1, finish)                          # warm-up
                before = client.stats(f"{TABLE}_plain")
                ms = {k: v * 1e3 for k, v in bench(sides, batches, args.rounds, finish).items()}
                print(f"{batch:>8,} {ms['redis']:>9.2f} {ms['kvstore plain']:>9.2f} {ms['kvstore summed']:>10.2f} "
                      f"{ms['kvstore stream']:>10.2f} {ms['redis'] / ms['kvstore plain']:>11.2f}x "
                      f"{ms['redis'] / ms['kvstore summed']:>12.2f}x {ms['redis'] / ms['kvstore stream']:>12.2f}x "
                      f"{hit_rate(before, client.stats(f'{TABLE}_plain')):>13.1%} {ms['redis pipelined']:>14.2f} "
                      f"{ms['kvstore pipelined']:>11.2f} {ms['redis pipelined'] / ms['kvstore pipelined']:>19.2f}x")
            stream.close()
            pipelined_stream.close()
            stepped = np.unique(np.concatenate([ids for ids, _ in batches]))
            difference = check_same_rows([db, db_pipelined], client, stepped, args.dim)
            print(f"rows after the run, Redis against kvstore: max |difference| {difference:.2e}")
    finally:
        server.terminate()
        server.wait(60)
        redis_proc.terminate()
        redis_proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
