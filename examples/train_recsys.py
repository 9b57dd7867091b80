"""Train a small recommendation model whose embedding tables live in kvstore.

Synthetic click data with learnable structure: each user and item has a hidden
factor vector; a click happens with probability sigmoid(<user, item> + bias).
The model (two embedding tables + an MLP) learns it; the script prints the
training loss and the held-out AUC.

    kvstore-server --data-dir /tmp/kv &
    python examples/train_recsys.py --address 127.0.0.1:50051
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from kvstore_client import KVStoreClient
from kvstore_client.torch_modules import RemoteEmbeddingBag
from torch import nn


def synthetic_clicks(n: int, users: int, items: int, factors: int, seed: int):
    """(user ids, item ids [n, 2] (item + its category), labels)."""
    rng = np.random.default_rng(seed)
    user_f = rng.standard_normal((users, factors))
    item_f = rng.standard_normal((items, factors))
    item_bias = rng.standard_normal(items)
    u = rng.integers(0, users, n)
    i = rng.zipf(1.2, n) % items
    logits = (user_f[u] * item_f[i]).sum(1) / np.sqrt(factors) * 1.5 + item_bias[i] - 0.5
    labels = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    item_bag = np.stack([i, items + i % 50], axis=1)        # item id and a category id share a table
    return u.astype(np.int64), item_bag.astype(np.int64), labels


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula (ties averaged)."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class Recommender(nn.Module):
    def __init__(self, client: KVStoreClient, dim: int, prefix: str):
        super().__init__()
        self.users = RemoteEmbeddingBag(client, f"{prefix}users", mode="sum")
        self.items = RemoteEmbeddingBag(client, f"{prefix}items", mode="mean")
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        u = self.users(users[:, None])
        i = self.items(items)
        return self.mlp(torch.cat([u, i], dim=1)).squeeze(1) + (u * i).sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=200000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--prefetch", action="store_true", help="fetch batch i+1 while batch i trains")
    parser.add_argument("--prefix", default="example_")
    args = parser.parse_args()
    torch.manual_seed(0)

    users, items, labels = synthetic_clicks(args.samples, args.users, args.items, 8, seed=0)
    split = int(0.9 * len(labels))
    with KVStoreClient(args.address) as client:
        for name in ("users", "items"):
            table = f"{args.prefix}{name}"
            if table in client.list_tables():
                client.drop_table(table)
            client.create_table(table, dim=args.dim, optimizer={"name": "rowwise_adagrad", "lr": 0.1},
                                initializer={"kind": "normal", "scale": 0.1, "seed": 1})
        model = Recommender(client, args.dim, args.prefix)
        dense = torch.optim.Adam(model.mlp.parameters(), lr=3e-3)
        loss_fn = nn.BCEWithLogitsLoss()
        steps, start = 0, time.perf_counter()
        for epoch in range(args.epochs):
            batches = [slice(s, min(s + args.batch, split)) for s in range(0, split, args.batch)]
            total = 0.0
            for k, b in enumerate(batches):
                u, i, y = torch.from_numpy(users[b]), torch.from_numpy(items[b]), torch.from_numpy(labels[b])
                logits = model(u, i)
                if args.prefetch and k + 1 < len(batches):
                    nxt = batches[k + 1]
                    model.users.prefetch(torch.from_numpy(users[nxt])[:, None])
                    model.items.prefetch(torch.from_numpy(items[nxt]))
                loss = loss_fn(logits, y)
                dense.zero_grad()
                loss.backward()                    # pushes embedding gradients to the server
                dense.step()
                total += loss.item()
                steps += 1
            with torch.no_grad():
                test = slice(split, None)
                model.users.on_miss = model.items.on_miss = "init"     # evaluation stores nothing
                scores = model(torch.from_numpy(users[test]), torch.from_numpy(items[test])).numpy()
                model.users.on_miss = model.items.on_miss = "init_insert"
            print(f"epoch {epoch}: train loss {total / len(batches):.4f}  held-out AUC {auc(scores, labels[test]):.4f}")
        elapsed = time.perf_counter() - start
        print(f"{steps} steps in {elapsed:.1f}s: {steps / elapsed:.1f} steps/s, "
              f"{steps * args.batch * 3 / elapsed:,.0f} ids/s")


if __name__ == "__main__":
    main()
