"""The soak of tests/integration/test_soak.py, as long as you like: N client threads of mixed load
(80% lookups, 15% gradients, 5% updates and deletes, Zipf ids, lock holders, cancellers) against a
real server; prints calls, errors, p50/p99 per method and the server's peak RSS, then checks the
final state against the replay of the acknowledged calls.

    python bench/soak.py --seconds 600 [--clients 32] [--seed 0] [-- server args ...]
"""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.conftest import ServerProcess  # noqa: E402
from tests.integration.soak_workload import (  # noqa: E402
    cancelled_rows,
    create_tables,
    replay_mismatches,
    run_soak,
)
from tests.integration.test_soak import SERVER_ARGS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("server_args", nargs="*", help="extra kvstore-server arguments (after --)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # stop the server on the way out
    from kvstore_client import KVStoreClient

    server = ServerProcess(Path(tempfile.mkdtemp(prefix="kvstore-soak-")) / "data", *SERVER_ARGS,
                           *args.server_args).start()
    try:
        with KVStoreClient(server.address, timeout=120) as client:
            create_tables(client)
            result = run_soak(server.address, server.process.pid, args.clients, args.seconds, args.seed)
            print(result.report())
            kinds = Counter(error.split(" ", 2)[1] for error in result.errors)
            print("unexpected errors by code:", dict(kinds) or "none", *result.errors[:5], sep="\n  ")
            problems = replay_mismatches(client, result.workers)
            print("replay of acknowledged calls:", "equal" if not problems else problems)
            left = cancelled_rows(client)
            print("rows left by cancelled update streams:", left)
    finally:
        code = server.stop() if server.alive() else None
    print("server exit code on SIGTERM:", code)
    sys.exit(1 if result.errors or problems or left or code != 0 else 0)


if __name__ == "__main__":
    main()
