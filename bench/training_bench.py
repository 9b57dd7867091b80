"""Training steps/s of the example recommender: kvstore-backed bags vs local nn.EmbeddingBag.

One run, same model, data and batch size, for each batch size: (1) local
nn.EmbeddingBag (sparse gradients, torch.optim.Adagrad), (2) one RemoteEmbeddingBag
per table against a server on loopback, (3) the same with its prefetch pipeline,
(4) RemoteEmbeddingBagCollection waiting for each step's gradients, (5) the
collection pipelined (gradients of step i travel while the dense step runs and
batch i+1 is prepared), exact, (6) the same naming each next batch
(`next_batch`: its lookup goes out at once and is answered while backward runs; the
step's gradients re-read the rows they change), still exact, (6b) the same with the next batch named
in the forward (`collection(batch, next_batch=...)`: its lookup goes out before the forward waits
for its own rows; model `early`), (6c) `next_batch` and a prefetch of step i+2's rows (`warm`),
(7) bounded staleness (`--staleness`,
default 1: a forward may read rows that miss the last k steps' gradients, so the
server's optimizer step overlaps the next forward). Prints steps/s, ids/s and the
ratio to local: rows (5)-(7) side by side show what each change buys. The models take
turns, `--turn` steps each, so that other load on the machine weighs on all alike.
Beside steps/s it prints the server process's CPU milliseconds per step (user + system,
from /proc, all its threads) spent during each model's turns: the server's cost of a step,
which other load on a shared machine disturbs far less than steps/s, and the RocksDB rows
each remote model's tables read (found there) and wrote per step. Work a model leaves behind
(write-back flushes, writes of evicted rows) may land in the next model's turn: the last line
charges the server's CPU over the whole run to the remote models, which is exact with one
(`--models pipelined`).

    python bench/training_bench.py [--steps 200] [--batches 1024,8192] [--staleness 1] [--turn 10]
                                   [--models pipelined,ahead] [--torch-threads 8] [--same-host on]
                                   [--shards 4]
                                   [--device cuda --cache-device cuda [--cuda-ipc off]]

`--device cuda` trains every model on the GPU (the local bags too); `--cache-device cuda` puts the
remote tables' caches in the server's GPU memory, and with `--same-host on` their rows and
gradients then go through CUDA IPC unless `--cuda-ipc off` (docs/same-host.md). `--cache-device
cpu,cuda` runs each remote model twice in the same turns, over host-cached and GPU-cached tables,
and prints the GPU tables' steps/s over the host tables'.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from kvstore_server.allocator import keep_freed_memory
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from kvstore_client import KVStoreClient  # noqa: E402
from kvstore_client.collection import Feature, RemoteEmbeddingBagCollection  # noqa: E402
from kvstore_client.torch_modules import RemoteEmbeddingBag  # noqa: E402
from train_recsys import synthetic_clicks  # noqa: E402


class Model(nn.Module):
    def __init__(self, users: nn.Module, items: nn.Module, dim: int):
        super().__init__()
        self.users, self.items = users, items
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 64), nn.ReLU(), nn.Linear(64, 1))

    def embed(self, u, i, upcoming=None):
        return self.users(u[:, None]), self.items(i)

    def forward(self, u, i, upcoming=None):
        """`upcoming`: the next step's (users, items), which a collection may look up early."""
        a, b = self.embed(u, i, upcoming)
        return self.mlp(torch.cat([a, b], 1)).squeeze(1) + (a * b).sum(1)


class CollectionModel(Model):
    """The same model with both features in one RemoteEmbeddingBagCollection."""

    def __init__(self, collection: RemoteEmbeddingBagCollection, dim: int):
        super().__init__(nn.Identity(), nn.Identity(), dim)
        self.collection = collection

    def embed(self, u, i, upcoming=None):
        after = None if upcoming is None else {"user": upcoming[0][:, None], "item": upcoming[1]}
        out = self.collection({"user": u[:, None], "item": i}, next_batch=after)
        return out["user"], out["item"]


def process_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process `pid` and its child processes (a sharded server's
    shards) so far, all threads (0 where /proc has none)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            kids = [int(child) for child in children.read().split()]
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(process_cpu_seconds(kid) for kid in kids)


class Trainer:
    """One model's training loop, run a slice of steps at a time, so that the variants take turns
    and drifts in the machine's load weigh on all of them alike."""

    def __init__(self, model: Model, data, batch: int, prefetch: bool, sparse_opt=None, warm: bool = False,
                 device: str = "cpu", early: bool = False):
        self.model, self.data, self.batch, self.prefetch, self.sparse_opt = model, data, batch, prefetch, sparse_opt
        self.device = torch.device(device)
        model.to(self.device)
        self.warm = warm                      # a collection warms the server's cache with step i+2's rows
        self.early = early                    # a collection names the next batch in the forward
        self.dense = torch.optim.Adam(model.mlp.parameters(), lr=3e-3)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.step = 0
        self.tables: list[str] = []          # a remote model's kvstore tables

    def run(self, steps: int) -> float:
        """Seconds for the next `steps` steps."""
        start = time.perf_counter()
        for _ in range(steps):
            self._one()
        return time.perf_counter() - start

    def close(self) -> float:
        """Seconds to finish: a collection flushes, so every step is applied before its clock stops."""
        start = time.perf_counter()
        if isinstance(self.model, CollectionModel):
            self.model.collection.close()
        return time.perf_counter() - start

    def _one(self) -> None:
        users, items, labels = self.data
        model, batch = self.model, self.batch
        b = slice(self.step * batch, (self.step + 1) * batch)
        nxt = slice((self.step + 1) * batch, (self.step + 2) * batch)
        after = slice((self.step + 2) * batch, (self.step + 3) * batch)
        self.step += 1

        def tensor(array):
            return torch.from_numpy(array).to(self.device)

        upcoming = (tensor(users[nxt]), tensor(items[nxt])) if self.early else None
        logits = model(tensor(users[b]), tensor(items[b]), upcoming)
        if self.warm:
            model.collection.prefetch({"user": tensor(users[after])[:, None], "item": tensor(items[after])})
        if self.prefetch and isinstance(model, CollectionModel):   # the next batch's lookup goes behind the gradients
            model.collection.next_batch({"user": tensor(users[nxt])[:, None], "item": tensor(items[nxt])})
        elif self.prefetch:
            model.users.prefetch(tensor(users[nxt])[:, None])
            model.items.prefetch(tensor(items[nxt]))
        loss = self.loss_fn(logits, tensor(labels[b]))
        self.dense.zero_grad()
        if self.sparse_opt:
            self.sparse_opt.zero_grad()
        loss.backward()
        self.dense.step()
        if self.sparse_opt:
            self.sparse_opt.step()


REMOTE_KINDS = ("plain", "prefetch", "collection", "pipelined", "ahead", "early", "warm", "stale")


def remote_trainers(client: KVStoreClient, args, data, batch: int) -> dict[str, Trainer]:
    """One trainer per model kind and cache device (labelled with the device when there are several)."""
    trainers = {}
    devices = cache_devices(args)
    for kind in args.models.split(","):
        for device in devices:
            label, trainer = remote_trainer(client, args, data, batch, kind, device)
            trainers[label + (f" [{device}]" if len(devices) > 1 else "")] = trainer
    return trainers


def cache_devices(args) -> list[str]:
    return list(dict.fromkeys(args.cache_device.split(",")))


def remote_trainer(client: KVStoreClient, args, data, batch: int, kind: str, device: str) -> tuple[str, Trainer]:
    """A model of `kind` over two new tables whose caches are on `device`."""
    tables = {name: f"{kind}_{batch}_{device.replace(':', '')}_{name}" for name in ("users", "items")}
    for table in tables.values():
        client.create_table(table, dim=args.dim, optimizer={"name": "adagrad", "lr": 0.1},
                            cache={"rows": args.cache_rows, "flush_seconds": args.flush_seconds, "device": device})
    if kind in ("plain", "prefetch"):
        model = Model(RemoteEmbeddingBag(client, tables["users"], mode="sum"),
                      RemoteEmbeddingBag(client, tables["items"], mode="mean"), args.dim)
        label = f"RemoteEmbeddingBag ({kind})"
    else:
        collection = RemoteEmbeddingBagCollection(
            client, [Feature("user", tables["users"], "sum"), Feature("item", tables["items"], "mean")],
            pipeline=kind != "collection", staleness=args.staleness if kind == "stale" else 0)
        model = CollectionModel(collection, args.dim)
        label = {"collection": "Collection (waits)", "pipelined": "Collection (pipelined, exact)",
                 "ahead": "Collection (+ next_batch, exact)",
                 "early": "Collection (+ next_batch in forward)",
                 "warm": "Collection (+ prefetch of i+2, exact)",
                 "stale": f"Collection (staleness {args.staleness})"}[kind]
    trainer = Trainer(model, data, batch, kind in ("prefetch", "ahead"), warm=kind == "warm",
                      device=args.device, early=kind == "early")
    trainer.tables = list(tables.values())
    return label, trainer


def storage_per_step(client: KVStoreClient, trainer: Trainer) -> str:
    """RocksDB rows read (found there) and written per step by a remote model's tables (its counters over every
    step it ran, warm-up included): the storage work behind its server CPU."""
    stats = [client.stats(table) for table in trainer.tables]
    read, written = (sum(s.get(key, 0) for s in stats) / trainer.step for key in ("rows_read", "rows_written"))
    return f"{read:>9,.0f} {written:>12,.0f}"


def taking_turns(trainers: dict[str, Trainer], steps: int, turn: int,
                 server_pid: int | None = None) -> dict[str, tuple[float, float]]:
    """(steps/s, server CPU ms per step) of each trainer: 5 warm-up steps each, then `turn` steps
    each in turn until `steps`; the server's CPU is read before and after each turn."""
    spent = dict.fromkeys(trainers, 0.0)
    cpu = dict.fromkeys(trainers, 0.0)
    for trainer in trainers.values():
        trainer.run(5)
    done = 0
    while done < steps:
        count = min(turn, steps - done)
        for name, trainer in trainers.items():
            before = process_cpu_seconds(server_pid)
            spent[name] += trainer.run(count)
            cpu[name] += process_cpu_seconds(server_pid) - before
        done += count
    for name, trainer in trainers.items():
        before = process_cpu_seconds(server_pid)
        spent[name] += trainer.close()
        cpu[name] += process_cpu_seconds(server_pid) - before
    return {name: (steps / spent[name], 1000 * cpu[name] / steps) for name in trainers}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batches", default="1024,8192")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--cache-rows", type=int, default=1 << 18, help="cache slots of each remote table")
    parser.add_argument("--flush-seconds", type=float, default=1.0,
                        help="write-back interval of each remote table (cache.flush_seconds)")
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--staleness", type=int, default=1, help="k of the bounded-staleness row (default 1)")
    parser.add_argument("--turn", type=int, default=10, help="steps each model runs before the next takes its turn")
    parser.add_argument("--models", default=",".join(REMOTE_KINDS),
                        help=f"remote variants to run beside local (default all: {','.join(REMOTE_KINDS)})")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch's intra-op threads for every model, local included (default: torch's own "
                             "choice, one per core; on a trainer host its embedding server needs cores too)")
    parser.add_argument("--same-host", choices=("off", "auto", "on"), default="off",
                        help="the remote models' rows and gradients through shared memory (docs/same-host.md)")
    parser.add_argument("--shards", type=int, default=1,
                        help="server processes (`kvstore-server --shards N`); the remote models use one ShardedClient "
                             "over them, which has no same-host path")
    parser.add_argument("--device", default="cpu", help="where every model trains: cpu or cuda")
    parser.add_argument("--cache-device", default="cpu",
                        help="the remote tables' cache.device: cpu, cuda, or several (cpu,cuda: each model once per "
                             "device, taking turns in the same run, with each device's ratio to the first)")
    parser.add_argument("--cuda-ipc", choices=("on", "off"), default="on",
                        help="with --same-host: a GPU table's rows and gradients through CUDA IPC")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    batches = [int(b) for b in args.batches.split(",")]
    keep_freed_memory()     # before the local model runs: the remote ones' client tunes malloc the same way
    print(f"training bench: dim {args.dim}, {args.steps} steps, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, models on {args.device}, remote caches on {args.cache_device}, "
          f"same-host {args.same_host}, CUDA IPC {args.cuda_ipc}, {args.shards} server shard(s), "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    data_dir = tempfile.mkdtemp(prefix="kvtrain-")
    server = subprocess.Popen([sys.executable, "-m", "kvstore_server", "--data-dir", data_dir, "--port", "0",
                               *(["--shards", str(args.shards)] if args.shards > 1 else [])],
                              stdout=subprocess.PIPE, text=True)
    address = next(line for line in server.stdout if "listening on" in line).strip().rsplit(" ", 1)[-1]
    address = address.split(",") if args.shards > 1 else address       # a list: one ShardedClient
    try:
        same_host = {"off": False, "auto": "auto", "on": True}[args.same_host]
        with KVStoreClient(address, timeout=300, same_host=same_host) as client:
            if args.shards == 1:
                client.same_host.cuda_ipc = args.cuda_ipc == "on"
            for batch in batches:
                torch.manual_seed(0)
                data = synthetic_clicks((args.steps + 7) * batch, args.users, args.items, 8, seed=0)
                local_users = nn.EmbeddingBag(args.users, args.dim, mode="sum", sparse=True).to(args.device)
                local_items = nn.EmbeddingBag(args.items + 50, args.dim, mode="mean", sparse=True).to(args.device)
                sparse_opt = torch.optim.Adagrad(list(local_users.parameters()) + list(local_items.parameters()),
                                                 lr=0.1)
                trainers = {"local nn.EmbeddingBag": Trainer(Model(local_users, local_items, args.dim), data, batch,
                                                             False, sparse_opt, device=args.device),
                            **remote_trainers(client, args, data, batch)}
                start_cpu = process_cpu_seconds(server.pid)
                results = taking_turns(trainers, args.steps, args.turn, server.pid)
                run_cpu = process_cpu_seconds(server.pid) - start_cpu
                local = results["local nn.EmbeddingBag"][0]
                print(f"\nbatch {batch}: {batch * 3} ids per step")
                print(f"{'model':34} {'steps/s':>8} {'ids/s':>10} {'vs local':>8} {'server ms/step':>14} "
                      f"{'read/step':>9} {'written/step':>12}")
                for name, (rate, server_ms) in results.items():
                    storage = storage_per_step(client, trainers[name]) if trainers[name].tables else ""
                    print(f"{name:34} {rate:>8.1f} {rate * batch * 3:>10,.0f} {rate / local:>8.2f} "
                          f"{server_ms:>14.1f} {storage}")
                devices = cache_devices(args)
                for name, (rate, _) in results.items():      # e.g. GPU tables against host tables, same run
                    if len(devices) > 1 and name.endswith(f" [{devices[0]}]"):
                        base = name[:-len(f" [{devices[0]}]")]
                        for device in devices[1:]:
                            other = results[f"{base} [{device}]"][0]
                            print(f"{base}: tables on {device} train at {other / rate:.2f} of tables on {devices[0]}")
                remote = len(trainers) - 1
                print(f"server CPU over the whole run, every turn included: {run_cpu:.1f} s, "
                      f"{1000 * run_cpu / (args.steps * remote):.1f} ms per step of each of {remote} remote models")
    finally:
        server.terminate()
        server.wait(300)                         # a loaded machine drains and flushes slowly
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
