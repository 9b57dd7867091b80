"""Train a small recommendation model whose embedding tables live in kvstore.

Synthetic click data with learnable structure: each user and item has a hidden
factor vector; a click happens with probability sigmoid(<user, item> + bias).
The model (two embedding tables + an MLP) learns it; the script prints, per
epoch, the training loss, the held-out AUC, the time the epoch took and its
steps/s. Tables left by an earlier run are trained further; `--reset` starts
from fresh ones.

    kvstore-server --data-dir /tmp/kv &
    python examples/train_recsys.py --address 127.0.0.1:50051 [--reset] [--prefetch]
"""
from __future__ import annotations

import argparse
import sys
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
    parser.add_argument("--prefetch", action="store_true",
                        help="fetch batch i+1's rows while batch i trains. Helps when the round trip to the "
                             "server is a large part of a step (server on another host, small batches); on one "
                             "machine with few cores the extra call competes for the same CPUs and can cost more "
                             "than it hides: compare the steps/s of both runs")
    parser.add_argument("--prefix", default="example_", help="table name prefix (default example_)")
    parser.add_argument("--reset", action="store_true",
                        help="drop this example's tables first (default: keep training the ones there)")
    args = parser.parse_args()
    torch.manual_seed(0)

    users, items, labels = synthetic_clicks(args.samples, args.users, args.items, 8, seed=0)
    split = int(0.9 * len(labels))
    with KVStoreClient(args.address) as client:
        prepare_tables(client, args)
        model = Recommender(client, args.dim, args.prefix)
        dense = torch.optim.Adam(model.mlp.parameters(), lr=3e-3)
        loss_fn = nn.BCEWithLogitsLoss()
        steps, start = 0, time.perf_counter()
        for epoch in range(args.epochs):
            epoch_start = time.perf_counter()
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
            took = time.perf_counter() - epoch_start
            print(f"epoch {epoch}: train loss {total / len(batches):.4f}  held-out AUC {auc(scores, labels[test]):.4f}"
                  f"  {took:.1f} s, {len(batches) / took:.1f} steps/s", flush=True)
        elapsed = time.perf_counter() - start
        print(f"{steps} steps in {elapsed:.1f}s: {steps / elapsed:.1f} steps/s, "
              f"{steps * args.batch * 3 / elapsed:,.0f} ids/s")


def prepare_tables(client: KVStoreClient, args: argparse.Namespace) -> None:
    """Create the two tables; with --reset drop them first; an existing one of another dim stops the run."""
    existing = set(client.list_tables())
    for name in ("users", "items"):
        table = f"{args.prefix}{name}"
        if table in existing and args.reset:
            client.drop_table(table)
            print(f"dropped table {table} (--reset)")
        elif table in existing:
            dim = client.describe_table(table)["dim"]
            if dim != args.dim:
                sys.exit(f"table {table} exists with dim {dim}, not {args.dim}: pass --reset to drop it, "
                         f"or --prefix for other tables")
            print(f"training table {table} further (from an earlier run; --reset starts fresh)")
            continue
        client.create_table(table, dim=args.dim, optimizer={"name": "rowwise_adagrad", "lr": 0.1},
                            initializer={"kind": "normal", "scale": 0.1, "seed": 1},
                            cache={"flush_seconds": 60})     # trained rows reach RocksDB once a minute


if __name__ == "__main__":
    main()
