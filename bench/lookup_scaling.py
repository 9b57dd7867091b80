"""The `lookup` suite's size sweep alone: the same in-process lookups on tables of each size,
with their limits, then the scaling notes (throughput at the largest table over the smallest,
cost per row against batch size). Not a test.

The full suite runs this sweep after its whole matrix at the smallest size; this runs only the
sweep's cases (dim 64; every row cached and cold; uniform ids at every batch size, Zipf at one),
so the 10M-row figure can be taken in minutes. It needs memory for each size's rows twice over
(the rows themselves and a cache of twice their slots) and disk for two copies in RocksDB.

    python bench/lookup_scaling.py                                   # 1M and 10M rows
    python bench/lookup_scaling.py --sizes 100000,1000000 --scratch /big/disk
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))       # run as a script: `bench` importable
from bench.context import Context  # noqa: E402
from bench.report import ResultLog, environment  # noqa: E402
from bench.suites import lookup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000", help="table rows, comma separated")
    parser.add_argument("--scratch", default=None, help="where the tables go (default: the temp dir)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    log = ResultLog(args.out, "lookup", environment({"suite": "lookup", "quick": False, "part": "sizes"}))
    ctx = Context(log, quick=False, scratch=args.scratch)
    plan = replace(lookup.FULL, sizes=sizes)
    records = []
    try:
        for rows in sizes:
            records += lookup.run_size(ctx, plan, rows, first=False)
        lookup.scaling_notes(ctx, plan, records)
    finally:
        ctx.close()
        log.finish()


if __name__ == "__main__":
    main()
