"""kill -9 cycles against a real server, many of them: the crash test of tests/integration, longer.

    python bench/crash_cycles.py --cycles 200 --mode write_back [--seed 0]

Each cycle writes (updates and adagrad steps, acknowledged by the server), SIGKILLs the server at
a random moment, restarts it and checks every row against its mode's promise (the promises are
in tests/integration/crash.py). Prints cycles, acknowledged writes verified, rows lost (outside
the promise) and rows torn (weights and state from two writes); lost and torn must be 0.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from integration.conftest import ServerProcess  # noqa: E402
from integration.crash import MODES, run_cycles  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--mode", choices=sorted(MODES), default="write_back")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        servers: list[ServerProcess] = []

        def start(flags):
            servers.append(ServerProcess(data_dir, *flags).start())
            return servers[-1]

        began = time.monotonic()
        try:
            tally = run_cycles(start, args.mode, args.cycles, args.seed)
        finally:
            if servers and servers[-1].alive():
                servers[-1].stop()
    print(f"mode={args.mode} cycles={tally.cycles} verified={tally.verified} lost={tally.lost} "
          f"torn={tally.torn} seconds={time.monotonic() - began:.1f}")
    for problem in tally.problems[:20]:
        print("  " + problem)
    return 0 if tally.lost == tally.torn == 0 and tally.cycles == args.cycles else 1


if __name__ == "__main__":
    sys.exit(main())
