"""`python -m bench`: run suites, draw plots, or run one of the standalone scripts.

    python -m bench run SUITE [--quick] [--out DIR]     SUITE: lookup, train, ingest, snapshot, export, mixed, all
    python -m bench plot --in DIR [--out docs/benchmarks]
    python -m bench table --in DIR                       saved results as Markdown
    python -m bench script NAME [ARGS...]               store_bench, grpc_bench, snapshot_bench, eviction_bench,
                                                        training_bench, gpu_cache, cold_lookup_bench,
                                                        lookup_scaling
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback
from pathlib import Path

from .context import Context
from .harness import Disagreement
from .report import ResultLog, environment, environment_line, markdown
from .suites import SUITES, runner

SCRIPTS = ("store_bench", "grpc_bench", "snapshot_bench", "eviction_bench", "training_bench", "gpu_cache",
           "cold_lookup_bench", "lookup_scaling")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def run_suites(names: list[str], quick: bool, out: str, scratch: str | None, sizes: list[int] | None = None) -> int:
    failed = []
    for name in names:
        log = ResultLog(out, name, environment({"suite": name, "quick": quick}))
        ctx = Context(log, quick, scratch, sizes)
        try:
            runner(name)(ctx)
        except Disagreement as exc:
            log.note(name, f"FAILED: comparators disagree: {exc}")
            failed.append(name)
        except Exception:
            log.note(name, f"FAILED:\n{traceback.format_exc()}")
            failed.append(name)
        finally:
            ctx.close()
            log.finish()
    if failed:
        print(f"failed suites: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def run_script(name: str, args: list[str]) -> int:
    """A standalone script as `python bench/NAME.py ARGS` would run it."""
    sys.argv = [str(Path(__file__).resolve().parent / f"{name}.py"), *args]
    runpy.run_module(f"bench.{name}", run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a suite (or all) and record its figures")
    run.add_argument("suite", choices=[*SUITES, "all"])
    run.add_argument("--quick", action="store_true", help="one small case per suite: checks it runs and that "
                                                          "comparators agree, not timings")
    run.add_argument("--out", default=str(DEFAULT_OUT), help=f"results directory (default {DEFAULT_OUT.name}/ "
                                                             "beside this package)")
    run.add_argument("--scratch", default=None, help="where data goes while a suite runs (default: the temp dir)")
    run.add_argument("--sizes", type=lambda text: [int(x) for x in text.split(",")], default=None,
                     help="lookup: table sizes in rows, comma separated (default 1000000,10000000)")
    plot = commands.add_parser("plot", help="draw PNG plots from results")
    plot.add_argument("--in", dest="src", default=str(DEFAULT_OUT), help="results directory")
    plot.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "benchmarks"))
    table = commands.add_parser("table", help="print saved results as Markdown tables")
    table.add_argument("--in", dest="src", default=str(DEFAULT_OUT), help="results directory")
    script = commands.add_parser("script", help="run one of the standalone scripts")
    script.add_argument("name", choices=SCRIPTS)
    script.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_suites(list(SUITES) if args.suite == "all" else [args.suite], args.quick, args.out, args.scratch,
                           args.sizes)
    if args.command == "plot":
        from .plot import plot_all

        return plot_all(args.src, args.out)
    if args.command == "table":
        return print_tables(args.src)
    return run_script(args.name, args.args)


def print_tables(src: str) -> int:
    from .plot import load_results

    records, envs = load_results(src)
    for env in envs:
        print(f"{env.get('suite', '')}: {environment_line(env)}\n")
    print(markdown(records))
    return 0 if records else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
