"""The soak workload: many clients, mixed calls, and a final state that a replay predicts exactly.

Why the replay is deterministic whatever the interleaving:
- Gradients go to an SGD table with a zeros initializer, lr = 1/4 and gradients that are multiples
  of 1/8 in [-1/4, 1/4]: every sum of them is exact in float32 (far below 2**24 eighths), so the
  final row is -lr * (sum of the acknowledged gradients) in any order. Anyone may step any row
  (Zipf ids, duplicates within a batch), and a lost or doubled update shows as a wrong value.
  Lookups of that table may insert rows (init_insert): they insert zeros, which change nothing.
- Updates and deletes go to a second table, each worker in its own id range, so the last
  acknowledged call of that one worker decides each row (read-your-writes is checked on the way).
  Lookups of that table never insert (on_miss zeros), so a deleted row stays deleted.
- Cancelled writes (all the writes of the cancellers) go to a third table and must leave no row.
A refused call (RESOURCE_EXHAUSTED, the asyncio server's admission control) applied nothing and is
counted, not replayed; any other error is unexpected. Timings are reported, never asserted.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
import numpy as np
from kvstore_client import KVStoreClient, KVStoreError
from kvstore_proto.tensors import encode_ids, encode_tensor
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc

GRADS, ROWS, CANCELLED = "soak_grads", "soak_rows", "soak_cancelled"
DIM = 8
LR = 0.25
GRAD_IDS = 20_000            # id universe of the gradient table (Zipf over it)
ROWS_PER_WORKER = 256        # each worker's own id range in ROWS and CANCELLED
BATCH = 64
LOCKERS, CANCELLERS = 4, 3   # workers that hold prefetch locks; workers that cancel mid-stream
CACHE = {"rows": 2048, "ways": 8}     # small: eviction and write-back run all the time


@dataclass
class Worker:
    """One client thread's calls, its acknowledged writes and what went wrong."""

    index: int
    address: str
    seed: int
    latencies: dict = field(default_factory=lambda: defaultdict(list))
    errors: list = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)
    grad_sum: np.ndarray = field(default_factory=lambda: np.zeros((GRAD_IDS, DIM)))
    rows: np.ndarray = field(default_factory=lambda: np.zeros((ROWS_PER_WORKER, DIM), np.float32))
    present: np.ndarray = field(default_factory=lambda: np.zeros(ROWS_PER_WORKER, bool))

    @property
    def first_id(self) -> int:
        return self.index * ROWS_PER_WORKER

    def run(self, start: threading.Barrier, stop: threading.Event) -> None:
        rng = np.random.default_rng(self.seed)
        with KVStoreClient(self.address, timeout=60) as client, grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.EmbeddingStoreStub(channel)
            start.wait()
            while not stop.is_set():
                self.one_call(client, stub, rng)

    def one_call(self, client: KVStoreClient, stub, rng: np.random.Generator) -> None:
        """80% lookups, 15% gradients, 5% updates and deletes; a canceller's writes are all
        cancelled updates, and one in eight of its lookups is cancelled."""
        draw = rng.random()
        canceller = LOCKERS <= self.index < LOCKERS + CANCELLERS
        if draw < 0.80:
            if canceller and draw < 0.10:
                self.timed("lookup_cancelled", cancel_lookup, stub, rng)
            elif draw < 0.40:
                self.timed("lookup", client.lookup, GRADS, zipf_ids(rng))
            else:
                self.timed("lookup_own", self.lookup_own, client, rng)
        elif canceller:
            self.timed("update_cancelled", cancel_update, stub, self.first_id, rng)
        elif draw < 0.95:
            self.apply_gradients(client, rng)
        elif draw < 0.985:
            self.update(client, rng)
        else:
            self.delete(client, rng)

    def timed(self, name: str, method, *args) -> bool:
        """Call `method`; its latency is recorded; True when it was acknowledged."""
        started = time.perf_counter()
        try:
            method(*args)
        except (KVStoreError, grpc.RpcError) as error:
            code, message = (error.code, error.message) if isinstance(error, KVStoreError) else \
                (error.code(), error.details())
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.refused[name] += 1
            else:
                self.errors.append(f"{name}: {code.name} {message}")
            return False
        self.latencies[name].append(time.perf_counter() - started)
        return True

    def apply_gradients(self, client: KVStoreClient, rng: np.random.Generator) -> None:
        ids = zipf_ids(rng)
        grads = (rng.integers(-2, 3, size=(len(ids), DIM)) / 8).astype(np.float32)
        if self.index < LOCKERS:
            if not self.timed("prefetch_lock", client.prefetch, GRADS, np.unique(ids), True):
                return
            acknowledged = self.timed("apply_gradients_release", client.apply_gradients, GRADS, ids, grads, True)
        else:
            acknowledged = self.timed("apply_gradients", client.apply_gradients, GRADS, ids, grads)
        if acknowledged:
            np.add.at(self.grad_sum, ids, grads)

    def own_ids(self, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(ROWS_PER_WORKER, size=int(rng.integers(1, 17)), replace=False)

    def lookup_own(self, client: KVStoreClient, rng: np.random.Generator) -> None:
        local = self.own_ids(rng)
        got = client.lookup(ROWS, local + self.first_id, on_miss="zeros")
        if not np.array_equal(got, self.rows[local]):
            self.errors.append(f"lookup_own: worker {self.index} read rows other than its acknowledged writes")

    def update(self, client: KVStoreClient, rng: np.random.Generator) -> None:
        local = self.own_ids(rng)
        values = (rng.integers(-64, 65, size=(len(local), DIM)) / 4).astype(np.float32)
        if self.timed("update", client.update, ROWS, local + self.first_id, values):
            self.rows[local], self.present[local] = values, True

    def delete(self, client: KVStoreClient, rng: np.random.Generator) -> None:
        local = self.own_ids(rng)
        if self.timed("delete", client.delete, ROWS, local + self.first_id):
            self.rows[local], self.present[local] = 0, False


def zipf_ids(rng: np.random.Generator, n: int = BATCH) -> np.ndarray:
    """Skewed ids over the gradient table: a few hot rows, a long tail."""
    return ((rng.zipf(1.2, size=n) - 1) * 7919 % GRAD_IDS).astype(np.int64)


def held_open(chunks, sent: threading.Event, release: threading.Event):
    """`chunks`, then no half-close: `sent` is set and the stream waits for `release`."""
    yield from chunks
    sent.set()
    release.wait()


def cancel_update(stub, first_id: int, rng: np.random.Generator) -> None:
    """Two chunks of an update to CANCELLED, then a cancel before the half-close: nothing may stay."""
    ids = first_id + rng.choice(ROWS_PER_WORKER, size=8, replace=False)
    chunks = [pb.UpdateRequest(table=CANCELLED, ids=encode_ids(part), weights=encode_tensor(np.ones((4, DIM),
                                                                                                    np.float32)))
              for part in (ids[:4], ids[4:])]
    sent, release = threading.Event(), threading.Event()
    future = stub.Update.future(held_open(chunks, sent, release), timeout=60)
    sent.wait()
    future.cancel()
    release.set()


def cancel_lookup(stub, rng: np.random.Generator) -> None:
    """A lookup stream cancelled after its first response, with a second chunk still to come."""
    sent, release = threading.Event(), threading.Event()
    chunk = pb.LookupRequest(table=GRADS, ids=encode_ids(zipf_ids(rng)))
    responses = stub.Lookup(held_open([chunk], sent, release), timeout=60)
    next(responses)
    responses.cancel()
    release.set()


@dataclass
class SoakResult:
    workers: list[Worker]
    seconds: float
    peak_rss_bytes: int

    @property
    def calls(self) -> int:
        return sum(len(times) for worker in self.workers for times in worker.latencies.values())

    @property
    def errors(self) -> list[str]:
        return [error for worker in self.workers for error in worker.errors]

    def latencies(self) -> dict[str, np.ndarray]:
        merged = defaultdict(list)
        for worker in self.workers:
            for name, times in worker.latencies.items():
                merged[name] += times
        return {name: np.array(times) for name, times in sorted(merged.items())}

    def report(self) -> str:
        refused = sum((worker.refused for worker in self.workers), Counter())
        lines = [f"soak: {len(self.workers)} clients, {self.seconds:.0f} s, {self.calls} acknowledged calls, "
                 f"{len(self.errors)} unexpected errors, refused (RESOURCE_EXHAUSTED) {dict(refused)}, "
                 f"server peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"]
        for name, times in self.latencies().items():
            p50, p99 = np.percentile(times, [50, 99]) * 1e3
            lines.append(f"  {name:24s} calls {len(times):7d}  p50 {p50:8.2f} ms  p99 {p99:8.2f} ms")
        return "\n".join(lines)


def create_tables(client: KVStoreClient) -> None:
    zeros = {"kind": "zeros"}
    client.create_table(GRADS, DIM, optimizer={"name": "sgd", "lr": LR}, initializer=zeros, cache=CACHE)
    client.create_table(ROWS, DIM, initializer=zeros, cache=CACHE)
    client.create_table(CANCELLED, DIM, initializer=zeros, cache=CACHE)


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def run_soak(address: str, server_pid: int, clients: int = 32, seconds: float = 30.0, seed: int = 0) -> SoakResult:
    """`clients` workers against the server at `address` for `seconds` (a duration, not a verdict:
    whatever each call answers is checked the same way however long the run is)."""
    workers = [Worker(index, address, seed * 1000 + index) for index in range(clients)]
    start, stop = threading.Barrier(clients + 1), threading.Event()
    threads = [threading.Thread(target=worker.run, args=(start, stop), name=f"soak-{worker.index}")
               for worker in workers]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return SoakResult(workers, time.perf_counter() - began, peak_rss(server_pid))


def replay_mismatches(client: KVStoreClient, workers: list[Worker]) -> list[str]:
    """Where the server's final state differs from the replay of the acknowledged calls."""
    problems = []
    expected = (-LR * sum(worker.grad_sum for worker in workers)).astype(np.float32)
    got = client.lookup(GRADS, np.arange(GRAD_IDS), on_miss="zeros")
    wrong = np.flatnonzero((got != expected).any(axis=1))
    if len(wrong):
        problems.append(f"{GRADS}: {len(wrong)} rows differ from the sum of acknowledged gradients, "
                        f"e.g. id {wrong[0]}: {got[wrong[0]]} != {expected[wrong[0]]}")
    own = np.arange(len(workers) * ROWS_PER_WORKER)
    got = client.lookup(ROWS, own, on_miss="zeros")
    expected = np.concatenate([worker.rows for worker in workers])
    if not np.array_equal(got, expected):
        problems.append(f"{ROWS}: {int((got != expected).any(axis=1).sum())} rows differ from the last acknowledged "
                        "update or delete")
    stored = set(client.export_table(ROWS).ids.tolist())
    present = set(own[np.concatenate([worker.present for worker in workers])].tolist())
    if stored != present:
        problems.append(f"{ROWS}: {len(stored ^ present)} ids stored or missing against the acknowledged calls")
    return problems


def cancelled_rows(client: KVStoreClient) -> int:
    """Rows that cancelled update streams left behind (there must be none)."""
    return len(client.export_table(CANCELLED).ids)
