"""Wall time and CPU of `kvstore export` and `kvstore import` passes against one server.

    python bench/transfer_cpu.py [--rows 1000000] [--dim 128] [--reps 2] [--dir DIR] [--baseline DIR --rounds 3]

Starts `python -m kvstore_server` on a data directory holding one table of `rows` rows (made by
import on the first run; pass the same --dir to reuse it), then runs the `kvstore export`
command `reps` times and `kvstore import` of that export into new tables `reps` times. Prints
MiB/s of ids and weights, the CPU seconds of the server with its worker processes (from /proc,
children included once reaped) and of the command, and the load average: the CPU figures are
what a loaded machine disturbs least. Each import reads an export whose files are first dropped
from the page cache (as a restore on another host or after a restart reads them; `--cached`
leaves them cached: a tree whose export writes through the page cache then imports from
memory). With `--baseline DIR` (a checkout of an earlier kvstore)
the two trees take turns on the same data directory, `rounds` rounds, each tree with its own
server and command, and the medians and their ratios close the run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from kvstore_client import KVStoreClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))       # run as a script: `bench` importable
from bench.report import python_env  # noqa: E402
from bench.services import stop_process  # noqa: E402


def process_cpu(pid: int) -> float:
    """User + system seconds of a process and its reaped children."""
    with open(f"/proc/{pid}/stat") as src:
        fields = src.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


def start_server(data: str, env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "kvstore_server", "--data-dir", data, "--port", "0",
                             "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.strip().rsplit(" ", 1)[-1]
    proc.wait()
    raise RuntimeError(f"the server of {env['PYTHONPATH']} did not start (exit code {proc.returncode})")


def drop_from_page_cache(directory: str) -> None:
    """Evict a directory's files from the page cache (clean pages: no privilege needed)."""
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_table(client: KVStoreClient, rows: int, dim: int) -> None:
    if "exp" in client.list_tables():
        return
    weights = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    client.create_table("exp", dim, cache={"rows": 4096})
    for start in range(0, rows, 100_000):
        client.import_table("exp", np.arange(start, min(rows, start + 100_000)), weights[start:start + 100_000])


def timed_command(server: subprocess.Popen, address: str, env: dict, payload_mib: float, label: str,
                  *args: str) -> dict:
    server_cpu, command_cpu, began = process_cpu(server.pid), children_cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "kvstore_client", "--address", address, "--quiet", *args],
                   check=True, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - began
    figure = {"mib_s": payload_mib / wall, "server": process_cpu(server.pid) - server_cpu,
              "command": children_cpu() - command_cpu, "load": os.getloadavg()[0]}
    print(f"{label}: {figure['mib_s']:.0f} MiB/s ({wall:.2f} s), server+workers CPU {figure['server']:.2f} s, "
          f"command CPU {figure['command']:.2f} s, load {figure['load']:.1f}", flush=True)
    return figure


def passes(data: str, out: str, env: dict, args: argparse.Namespace, label: str = "") -> dict[str, list[dict]]:
    """`reps` exports, then `reps` imports of the first, against one server of the tree `env` runs."""
    payload_mib = args.rows * (8 + args.dim * 4) / 2**20
    server, address = start_server(data, env)
    figures: dict[str, list[dict]] = {"export": [], "import": []}
    try:
        with KVStoreClient(address, timeout=600) as client:
            load_table(client, args.rows, args.dim)
            for rep in range(args.reps):
                shutil.rmtree(f"{out}/x{rep}", ignore_errors=True)
                figures["export"].append(timed_command(server, address, env, payload_mib, f"{label}export",
                                                       "export", "exp", f"{out}/x{rep}"))
            for rep in range(args.reps):
                if f"imp{rep}" in client.list_tables():
                    client.drop_table(f"imp{rep}")
                if not args.cached:
                    drop_from_page_cache(f"{out}/x0")
                figures["import"].append(timed_command(server, address, env, payload_mib, f"{label}import",
                                                       "import", f"imp{rep}", f"{out}/x0"))
    finally:
        stop_process(server)
    return figures


def summary(results: dict[str, dict[str, list[dict]]]) -> None:
    """Medians per tree and transfer, and this tree's ratio to the baseline."""
    print("\n| transfer | tree | MiB/s | server+workers CPU s | command CPU s | CPU per pass s | load |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in ("export", "import"):
        medians = {}
        for tree, figures in results.items():
            runs = figures[kind]
            medians[tree] = {key: statistics.median(f[key] for f in runs) for key in runs[0]}
            m = medians[tree]
            print(f"| {kind} | {tree} | {m['mib_s']:.0f} | {m['server']:.2f} | {m['command']:.2f} | "
                  f"{m['server'] + m['command']:.2f} | {min(f['load'] for f in runs):.1f}-"
                  f"{max(f['load'] for f in runs):.1f} |")
        if len(medians) == 2:
            new, old = medians["this tree"], medians["baseline"]
            print(f"| {kind} | ratio | {new['mib_s'] / old['mib_s']:.2f}x | | | "
                  f"{(new['server'] + new['command']) / (old['server'] + old['command']):.2f}x | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dir", default=None, help="data directory (kept); default: a temporary one")
    parser.add_argument("--baseline", default="", help="checkout of an earlier kvstore to run in turns with this one")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each tree with --baseline")
    parser.add_argument("--cached", action="store_true", help="imports read the export from the page cache")
    args = parser.parse_args()
    data = args.dir or tempfile.mkdtemp()
    out = tempfile.mkdtemp()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"baseline": python_env(args.baseline)} if args.baseline else {}
    trees["this tree"] = python_env(here)
    results: dict[str, dict[str, list[dict]]] = {tree: {"export": [], "import": []} for tree in trees}
    try:
        for _ in range(args.rounds if args.baseline else 1):
            for tree, env in trees.items():
                figures = passes(data, out, env, args, f"{tree}: " if args.baseline else "")
                for kind in figures:
                    results[tree][kind] += figures[kind]
        summary(results)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
