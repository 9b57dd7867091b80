"""A GPU trainer beside a GPU table's server: rows and gradients through CUDA IPC, the host, or the network.

One kvstore server process (`--cache-device cuda`) serves one GPU table with every row
cached. In this process three clients look up the same batches of CUDA ids and get CUDA
tensors back:
- `ipc`: same_host=True; the server gathers the rows straight into the client's GPU
  buffer (CUDA IPC);
- `shm`: same_host=True with `cuda_ipc` off; rows come through host shared memory and
  are copied up to the GPU by the client;
- `network`: rows in the gRPC answer, copied up by the client;
beside the limit of the same work in the trainer's own process: `torch.index_select` on a
copy of the table in its GPU memory (no service, no copies between processes), and the bare
gRPC stream of the same bytes (bench/echo.py, threaded and asyncio servers, the faster counts;
its rows stay on the host, so it is the transport's ceiling without the copy to the GPU). Batches are
timed in rotating order (grpc_bench.timed_side_by_side). Then a training step (lookup, then
apply_gradients of CUDA gradients; rowwise Adagrad, Zipf ids) through the three clients.

    python bench/cuda_ipc_bench.py [--rows 262144] [--dim 128] [--seconds 3] [--rounds 1] [--cpu]
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))       # run as a script: `bench` importable
from bench.echo import EchoClient, start_echo  # noqa: E402
from bench.grpc_bench import id_batches, load, lookup_arguments, start, timed_side_by_side  # noqa: E402


def main() -> None:
    args = lookup_arguments(rows=262_144).parse_args()
    proc, address = start([sys.executable, "-m", "kvstore_server", "--port", "0", "--cache-device", "cuda",
                           "--data-dir", tempfile.mkdtemp(prefix="kvbench-ipc-")])
    echoes = {"echo threaded": start_echo(), "echo asyncio": start_echo(asyncio_server=True)}
    try:
        pids = {name: proc.pid for name in ("ipc", "shm", "network")}
        pids.update({name: echo.pid for name, (echo, _) in echoes.items()})
        run(args, address, {name: echo_address for name, (_, echo_address) in echoes.items()},
            pids if args.cpu else None)
    finally:
        for process in (proc, *(echo for echo, _ in echoes.values())):
            process.terminate()
            process.wait(timeout=60)


def run(args, address: str, echo_addresses: dict[str, str], pids: dict[str, int] | None) -> None:
    import torch
    from kvstore_client import KVStoreClient

    cuda = torch.device("cuda:0")
    clients = {"ipc": KVStoreClient(address, timeout=600, same_host=True),
               "shm": KVStoreClient(address, timeout=600, same_host=True),
               "network": KVStoreClient(address, timeout=600)}
    clients["shm"].same_host.cuda_ipc = False
    load(clients["network"], args.rows, args.dim, "kvstore")
    local = torch.from_numpy(clients["network"].lookup("bench", np.arange(args.rows), on_miss="error")).to(cuda)
    rng = np.random.default_rng(1)
    perm = rng.permutation(args.rows)
    on_gpu: dict[int, tuple] = {}           # id -> (the batch, kept alive so its id is not reused; its copy)

    def gpu(batch: np.ndarray):
        if id(batch) not in on_gpu:
            on_gpu[id(batch)] = (batch, torch.from_numpy(batch).to(cuda))
        return on_gpu[id(batch)][1]

    lookups = {name: (lambda b, client=client: client.lookup("bench", gpu(b))) for name, client in clients.items()}

    def index_select(batch):
        rows = torch.index_select(local, 0, gpu(batch))
        torch.cuda.current_stream().synchronize()
        return rows

    lookups["index_select"] = index_select
    check = rng.integers(0, args.rows, 1000)
    for name, lookup in lookups.items():
        if not torch.equal(lookup(check), local[gpu(check)]):
            raise SystemExit(f"{name} disagrees with the table's rows")
    if clients["ipc"].same_host.device_pool(cuda) is None:
        raise SystemExit(f"no CUDA IPC: {clients['ipc'].same_host.device_reason}")
    echoes = {name: EchoClient(echo_address, clients["network"].chunk_bytes)
              for name, echo_address in echo_addresses.items()}
    for name, echo in echoes.items():                       # zero rows: the transport, not the values
        lookups[name] = lambda b, echo=echo: echo.lookup(b, args.dim)
    names = list(lookups)
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores, {torch.cuda.get_device_name(cuda)}; "
          f"dim {args.dim}, {args.rows:,} rows cached in GPU memory; CUDA ids in, CUDA rows out")
    print(f"{'ids':8} {'batch':>7} " + " ".join(f"{n + ' rows/s':>20}" for n in names)
          + f" {'ipc/shm':>8} {'ipc/net':>8} {'ipc/local':>10} {'ipc/echo':>9}")
    for dist in ("uniform", "zipf"):
        for batch in (4096, 65536, 262144):
            batches = id_batches(rng, dist, batch, args.rows, perm, args.seconds)
            rates, cpu = timed_side_by_side(lookups, batches, args.rounds, pids)
            echo = max(rates[name] for name in echoes)
            print(f"{dist:8} {batch:>7} " + " ".join(f"{rates[n]:>20,.0f}" for n in names)
                  + f" {rates['ipc'] / rates['shm']:>8.2f} {rates['ipc'] / rates['network']:>8.2f}"
                  + f" {rates['ipc'] / rates['index_select']:>10.2f} {rates['ipc'] / echo:>9.2f}", flush=True)
            if cpu:
                print(f"{'':8} server ms CPU per call: " + ", ".join(f"{n} {cpu[n]:.2f}" for n in cpu), flush=True)
    training_steps(args, clients, gpu, rng, perm, cuda)
    for client in (*clients.values(), *echoes.values()):
        client.close()


def training_steps(args, clients, gpu, rng, perm, cuda) -> None:
    """Lookup then apply_gradients of CUDA gradients (rowwise Adagrad, Zipf ids), through each client."""
    import torch

    clients["network"].create_table("steps", dim=args.dim, optimizer={"name": "rowwise_adagrad", "lr": 0.01},
                                    cache={"rows": -(-args.rows * 2 // 32) * 32})
    print(f"{'step':8} {'batch':>7} " + " ".join(f"{n + ' steps/s':>16}" for n in clients)
          + f" {'ipc/shm':>8} {'ipc/net':>8}")
    for batch in (4096, 65536):
        grads = torch.full((batch, args.dim), 1e-3, device=cuda)
        steps = {name: lambda b, client=client, grads=grads: (client.lookup("steps", gpu(b)),
                                                               client.apply_gradients("steps", gpu(b), grads))
                 for name, client in clients.items()}
        rates, _ = timed_side_by_side(steps, id_batches(rng, "zipf", batch, args.rows, perm, args.seconds / 4),
                                      args.rounds)
        print(f"{'zipf':8} {batch:>7} " + " ".join(f"{rates[n] / batch:>16.1f}" for n in clients)
              + f" {rates['ipc'] / rates['shm']:>8.2f} {rates['ipc'] / rates['network']:>8.2f}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
