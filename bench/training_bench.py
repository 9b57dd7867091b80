"""Training steps/s of the example recommender: kvstore-backed bags vs local nn.EmbeddingBag.

One run, same model, data and batch size: (1) local nn.EmbeddingBag (sparse
gradients, torch.optim.Adagrad), (2) RemoteEmbeddingBag against a server on
loopback, (3) the same with the prefetch pipeline. Prints steps/s, ids/s and
the ratio to local.

    python bench/training_bench.py [--steps 200] [--batch 1024]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from kvstore_client import KVStoreClient  # noqa: E402
from kvstore_client.torch_modules import RemoteEmbeddingBag  # noqa: E402
from train_recsys import synthetic_clicks  # noqa: E402


class Model(nn.Module):
    def __init__(self, users: nn.Module, items: nn.Module, dim: int):
        super().__init__()
        self.users, self.items = users, items
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, u, i):
        a, b = self.users(u[:, None]), self.items(i)
        return self.mlp(torch.cat([a, b], 1)).squeeze(1) + (a * b).sum(1)


def run(model: Model, data, steps: int, batch: int, prefetch: bool, sparse_opt=None) -> float:
    users, items, labels = data
    dense = torch.optim.Adam(model.mlp.parameters(), lr=3e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    start = None
    for step in range(steps + 5):
        if step == 5:
            start = time.perf_counter()          # after warm-up
        b = slice(step * batch, (step + 1) * batch)
        logits = model(torch.from_numpy(users[b]), torch.from_numpy(items[b]))
        if prefetch:
            nxt = slice((step + 1) * batch, (step + 2) * batch)
            model.users.prefetch(torch.from_numpy(users[nxt])[:, None])
            model.items.prefetch(torch.from_numpy(items[nxt]))
        loss = loss_fn(logits, torch.from_numpy(labels[b]))
        dense.zero_grad()
        if sparse_opt:
            sparse_opt.zero_grad()
        loss.backward()
        dense.step()
        if sparse_opt:
            sparse_opt.step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = synthetic_clicks((args.steps + 7) * args.batch, args.users, args.items, 8, seed=0)
    ids_per_step = args.batch * 3

    local_users = nn.EmbeddingBag(args.users, args.dim, mode="sum", sparse=True)
    local_items = nn.EmbeddingBag(args.items + 50, args.dim, mode="mean", sparse=True)
    sparse_opt = torch.optim.Adagrad(list(local_users.parameters()) + list(local_items.parameters()), lr=0.1)
    local = run(Model(local_users, local_items, args.dim), data, args.steps, args.batch, False, sparse_opt)

    data_dir = tempfile.mkdtemp(prefix="kvtrain-")
    server = subprocess.Popen(["kvstore-server", "--data-dir", data_dir, "--port", "0"], stdout=subprocess.PIPE,
                              text=True)
    address = server.stdout.readline().strip().rsplit(" ", 1)[-1]
    results = {"local nn.EmbeddingBag": local}
    try:
        with KVStoreClient(address, timeout=300) as client:
            for prefetch in (False, True):
                tag = "prefetch" if prefetch else "plain"
                for name in ("users", "items"):
                    client.create_table(f"{tag}_{name}", dim=args.dim, cache={"rows": 1 << 18},
                                        optimizer={"name": "adagrad", "lr": 0.1})
                model = Model(RemoteEmbeddingBag(client, f"{tag}_users", mode="sum"),
                              RemoteEmbeddingBag(client, f"{tag}_items", mode="mean"), args.dim)
                results[f"RemoteEmbeddingBag ({tag})"] = run(model, data, args.steps, args.batch, prefetch)
    finally:
        server.terminate()
        server.wait(60)
    print(f"{'model':34} {'steps/s':>8} {'ids/s':>10} {'vs local':>8}")
    for name, rate in results.items():
        print(f"{name:34} {rate:>8.1f} {rate * ids_per_step:>10,.0f} {rate / local:>8.2f}")


if __name__ == "__main__":
    main()
