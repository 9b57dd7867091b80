"""Lookups of rows the cache tier does not hold, through the service, beside Redis. Not a test.

The `lookup` suite's cold service case, on its own and with more sides, all interleaved by the
harness on the same batches: a kvstore-server of this checkout (the subject), the same server
with a RocksDB row cache (`--row-cache-bytes`), optionally the server of another checkout
(`--baseline DIR`, e.g. a worktree of main: before and after in one run) and Redis MGET of the
same rows (the peer). Every server holds the table with a 32-slot cache, so nearly every row
is read from RocksDB.

The harness repeats the same batches in every repetition: with `--rows-per-rep` small, a row
cache ends up holding them all. A `--rows-per-rep` of the table's size makes each repetition
read more distinct rows than the row cache holds (uniform ids), which is the fair setting for it.

    python bench/cold_lookup_bench.py                                  # 1M rows, dim 128
    python bench/cold_lookup_bench.py --rows-per-rep 1048576 --batches 65536 --reps 3
    python bench/cold_lookup_bench.py --baseline ../main               # before / after
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from kvstore_client import KVStoreClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))       # run as a script: `bench` importable
from bench import store_bench  # noqa: E402
from bench.context import Context, table_weights  # noqa: E402
from bench.echo import start_process  # noqa: E402
from bench.harness import LIMIT, PEER, SUBJECT, Side, compare  # noqa: E402
from bench.report import ResultLog, environment, python_env  # noqa: E402
from bench.services import stop_process  # noqa: E402
from bench.suites.common import make_batches  # noqa: E402
from bench.suites.lookup_service import load_server  # noqa: E402

TABLE = "cold"


def server_command(data_dir: Path, extra: list[str], checkout: str | None) -> list[str]:
    """kvstore-server on `data_dir`; from another checkout's packages when `checkout` is given."""
    cmd = [sys.executable, "-m", "kvstore_server", "--data-dir", str(data_dir), "--port", "0",
           "--metrics-port", "0", *extra]
    if checkout is None:
        return cmd
    return ["env", f"PYTHONPATH={python_env(checkout)['PYTHONPATH']}", *cmd]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batches", default="4096,65536")
    parser.add_argument("--dists", default="uniform,zipf")
    parser.add_argument("--rows-per-rep", type=int, default=1 << 17, help="ids per repetition (the suite's cold case)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--row-cache-bytes", type=int, default=256 << 20, help="0: no row-cache side")
    parser.add_argument("--baseline", default=None, help="another checkout whose server runs as one more side")
    parser.add_argument("--side", action="append", default=[], metavar="LABEL=ARGS",
                        help="one more side: this checkout's server with these arguments "
                             "(e.g. 'mmap reads=--rocksdb-mmap-reads true'); may be repeated")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()

    log = ResultLog(args.out, "cold-lookup", environment({"suite": "cold-lookup", "quick": False}))
    ctx = Context(log, quick=False)
    ctx.reps = args.reps
    variants = {"kvstore client lookup": ([], None)}
    if args.row_cache_bytes:
        variants[f"kvstore, row cache {args.row_cache_bytes >> 20} MiB"] = (
            ["--rocksdb-row-cache-bytes", str(args.row_cache_bytes)], None)
    for side in args.side:
        label, _, extra = side.partition("=")
        variants[f"kvstore, {label}"] = (extra.split(), None)
    if args.baseline:
        variants[f"kvstore at {Path(args.baseline).name}"] = ([], args.baseline)
    weights = table_weights(args.rows, args.dim, seed=args.dim)
    servers, clients = [], {}
    try:
        for label, (extra, checkout) in variants.items():
            proc, address = start_process(server_command(ctx.tmpdir("server-"), extra, checkout))
            servers.append(proc)
            clients[label] = KVStoreClient(address, timeout=600)
            load_server(clients[label], TABLE, weights, 32, warm=False)
        redis = ctx.redis("cold-lookup")
        if redis:
            redis.load(np.arange(args.rows, dtype=np.int64), weights)
        sampler = store_bench.IdSampler(args.rows, 1.05, seed=args.rows + 1)
        for dist in args.dists.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                case = {"path": "service", "rows": args.rows, "dim": args.dim, "cache": "cold", "dist": dist,
                        "batch": batch, "rows_per_rep": args.rows_per_rep}
                sides = [Side(label, SUBJECT if i == 0 else LIMIT,
                              lambda b, client=client: client.lookup(TABLE, b.ids, on_miss="error"))
                         for i, (label, client) in enumerate(clients.items())]
                if redis:
                    sides.append(Side("redis MGET (hiredis)", PEER, lambda b: redis.mget(b.ids, args.dim)))
                chosen = make_batches(sampler, dist, batch, args.rows_per_rep)
                log.add(compare("cold-lookup", case, sides, chosen, ctx.reps, expected=weights[chosen[0].ids]))
    finally:
        for client in clients.values():
            client.close()
        for proc in servers:
            stop_process(proc)
        ctx.close()
        log.finish()


if __name__ == "__main__":
    main()
