"""Server CPU per training step on the Train stream, with and without new rows, side by side.

One pipelined `RemoteEmbeddingBagCollection` per server drives the example recommender's
two features (user: a bag of 1, item: a bag of 2 in a shared table; dim 64, Adagrad) with
the bench's synthetic clicks; a step is the gradients of batch i and the lookup of batch
i+1 on one stream. Two servers run the same steps in turns, in the same run:
"new rows" draws users uniformly from `--users` (most of a batch's users are new, so the
server reads RocksDB for them, initializes and stores them), "cached" draws them from
`--cached-users` (after the warm-up every row is in the cache: what is left is decode,
dispatch, the optimizer step, the cache's gather and scatter, and encode). Prints each
server's CPU ms per step (user + system, all its threads, from /proc) and the ratio. Timing starts
after a few warm-up steps and two flush periods, so each server's first flush (on a fresh GPU
server, CuPy compiling what the flush uses) is not in a timed turn.
With `--baseline DIR` (a checkout of an earlier kvstore) that version's servers run the
same steps in the same turns, for a before/after. With `--cache-device cpu,cuda` every server
runs once with host-cached tables and once with GPU-cached ones, in the same turns, and the
GPU tables' CPU per step over the host tables' is printed. With `--by-thread`, each server's CPU
per step is also split by thread (the event loop, the store threads, the RocksDB writer, ...:
kvstore's threads carry their names at the OS level), summed over the timed turns.

    python bench/train_step_cpu.py [--batches 1024,8192] [--steps 40] [--rounds 2] [--baseline DIR]
                                   [--cache-device cpu,cuda] [--by-thread]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))       # run as a script: `bench` importable
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from kvstore_client import KVStoreClient  # noqa: E402
from kvstore_client.collection import Feature, RemoteEmbeddingBagCollection  # noqa: E402
from train_recsys import synthetic_clicks  # noqa: E402

from bench.grpc_bench import process_seconds, start, thread_seconds  # noqa: E402

FLUSH_SECONDS = 1.0       # the tables' cache.flush_seconds (the default): the flusher's period


def server_env(tree: str | None) -> dict | None:
    """The environment that runs the server of checkout `tree` (None: this one)."""
    if tree is None:
        return None
    tree = str(Path(tree).resolve())
    paths = [tree, f"{tree}/protos", f"{tree}/server", f"{tree}/client", os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))   # the tree first, then what else is set


class Driver:
    """One server and one collection over it, stepping through its own data a slice at a time."""

    def __init__(self, env: dict | None, data, batch: int, device: str = "cpu"):
        self.data_dir = tempfile.mkdtemp(prefix="kvstep-")
        cmd = [sys.executable, "-m", "kvstore_server", "--data-dir", self.data_dir, "--port", "0"]
        self.proc, address = start(cmd, env)
        self.client = KVStoreClient(address, timeout=300)
        for table in ("users", "items"):
            self.client.create_table(table, dim=64, cache={"rows": 1 << 18, "device": device,
                                                           "flush_seconds": FLUSH_SECONDS},
                                     optimizer={"name": "adagrad", "lr": 0.1})
        self.collection = RemoteEmbeddingBagCollection(
            self.client, [Feature("user", "users", "sum"), Feature("item", "items", "mean")])
        self.data, self.batch, self.done = data, batch, 0

    def cpu_ms_per_step(self, steps: int) -> float:
        """Run `steps` steps (all applied when it returns); the server's CPU ms per step."""
        users, items, _ = self.data
        used = process_seconds(self.proc.pid)
        for _ in range(steps):
            b = slice(self.done * self.batch, (self.done + 1) * self.batch)
            self.done += 1
            out = self.collection({"user": torch.from_numpy(users[b])[:, None], "item": torch.from_numpy(items[b])})
            (out["user"].sum() + out["item"].square().sum()).backward()
        self.collection.flush()
        return 1e3 * (process_seconds(self.proc.pid) - used) / steps

    def close(self) -> None:
        self.collection.close()
        self.client.close()
        self.proc.terminate()
        self.proc.wait(300)
        shutil.rmtree(self.data_dir, ignore_errors=True)     # a run leaves about 1 GiB per server otherwise


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1024,8192")
    parser.add_argument("--steps", type=int, default=40, help="steps per turn")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--cached-users", type=int, default=20_000)
    parser.add_argument("--baseline", help="an earlier kvstore checkout whose servers run beside this one's")
    parser.add_argument("--cache-device", default="cpu", help="the tables' cache.device; several: cpu,cuda")
    parser.add_argument("--by-thread", action="store_true", help="also split each server's CPU by thread")
    args = parser.parse_args()
    trees = {"this": None, **({"baseline": args.baseline} if args.baseline else {})}
    devices = list(dict.fromkeys(args.cache_device.split(",")))
    print(f"train step CPU bench: {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    for batch in (int(b) for b in args.batches.split(",")):
        total = (args.steps * args.rounds + 10) * batch
        data = {"new rows": synthetic_clicks(total, args.users, 100_000, 8, seed=0),
                "cached": synthetic_clicks(total, args.cached_users, 100_000, 8, seed=0)}
        drivers = {(tree, device, kind): Driver(server_env(path), data[kind], batch, device)
                   for tree, path in trees.items() for device in devices for kind in data}
        try:
            for driver in drivers.values():
                driver.cpu_ms_per_step(5)                          # warm-up
            time.sleep(2 * FLUSH_SECONDS)          # every server flushes once (a fresh GPU server compiles) untimed
            cpu = {key: [] for key in drivers}
            threads = {key: {} for key in drivers}                 # CPU seconds by kind of thread, timed turns
            for _ in range(args.rounds):                           # in turns: load drifts weigh on all alike
                for key, driver in drivers.items():
                    before = thread_seconds(driver.proc.pid) if args.by_thread else {}
                    cpu[key].append(driver.cpu_ms_per_step(args.steps))
                    for kind, seconds in (thread_seconds(driver.proc.pid) if args.by_thread else {}).items():
                        threads[key][kind] = threads[key].get(kind, 0.0) + seconds - before.get(kind, 0.0)
        finally:
            for driver in drivers.values():
                driver.close()
        print(f"\nbatch {batch} ({3 * batch} ids per step), {args.rounds} turns of {args.steps} steps, "
              f"load average {os.getloadavg()}")
        for tree in trees:
            for device in devices:
                new, cached = (cpu[tree, device, kind] for kind in data)
                print(f"{tree:9} {device:7} server CPU ms/step: new rows {' '.join(f'{c:6.1f}' for c in new)}   "
                      f"cached {' '.join(f'{c:6.1f}' for c in cached)}   new/cached {sum(new) / sum(cached):.2f}")
                for kind in data if args.by_thread else ():
                    split = sorted(threads[tree, device, kind].items(), key=lambda item: -item[1])
                    print(f"{'':17} by thread, {kind}: " + ", ".join(
                        f"{name} {1e3 * seconds / (args.steps * args.rounds):.2f}" for name, seconds in split
                        if seconds > 0))
            for device in devices[1:]:                             # e.g. GPU tables over host tables
                print(f"{tree:9} {device} over {devices[0]}: " + ", ".join(
                    f"{kind} {sum(cpu[tree, device, kind]) / sum(cpu[tree, devices[0], kind]):.2f}" for kind in data))


if __name__ == "__main__":
    main()
