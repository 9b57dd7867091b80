"""`kvstore-server --shards N`: N shard servers on one host, one process each.

One server process saturates about one core on its gRPC path; N processes use
N cores. Shard i listens on port base+i (any free port when the base is 0),
keeps its data in DIR/shard-i and starts with `--shard-index i`, so a data
directory can never be served as another shard. The parent forwards SIGTERM and
SIGINT, waits for every shard, and exits 0 only when all of them exited 0.
When all are up it prints one line, `kvstore-server listening on A0,A1,...`:
the address list a client takes, in shard order.
"""
from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time

from kvstore.errors import InvalidArgument

from .config import ServerConfig

log = logging.getLogger("kvstore_server")
START_TIMEOUT = 120.0
LISTENING = "kvstore-server listening on "
_OVERRIDDEN = {"--shards", "--port", "--data-dir", "--metrics-port", "--shard-index"}


def shard_argv(argv: list[str], config: ServerConfig, index: int) -> list[str]:
    """The command line of shard `index`: the parent's flags, with its own port, metrics port and data dir."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _OVERRIDDEN:
            skip = "=" not in arg
            continue
        kept.append(arg)
    port = config.port + index if config.port else 0
    metrics = config.metrics_port + index if config.metrics_port else 0
    return [*kept, "--port", str(port), "--metrics-port", str(metrics),
            "--data-dir", os.path.join(config.data_dir, f"shard-{index}"), "--shard-index", str(index)]


def _die_with_parent() -> None:
    """Children get SIGTERM when the parent dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _wait_listening(process: subprocess.Popen, index: int, deadline: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
    line = process.stdout.readline() if ready else ""
    if not line.startswith(LISTENING):
        raise RuntimeError(f"shard {index} did not start (exit code {process.poll()}): {line.strip()!r}")
    return line[len(LISTENING):].strip()


def run_shards(config: ServerConfig, argv: list[str], shards: int) -> int:
    """Start `shards` servers, print their addresses, and supervise them until SIGTERM or SIGINT."""
    if shards < 1:
        raise InvalidArgument(f"--shards: must be at least 1, got {shards}")
    if config.port and config.port + shards - 1 > 65535:
        raise InvalidArgument(f"--shards: ports {config.port}..{config.port + shards - 1} exceed 65535")
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    processes: list[subprocess.Popen] = []
    try:
        for index in range(shards):
            command = [sys.executable, "-m", "kvstore_server", *shard_argv(argv, config, index)]
            processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                                              preexec_fn=_die_with_parent))
        deadline = time.monotonic() + START_TIMEOUT
        addresses = [_wait_listening(p, i, deadline) for i, p in enumerate(processes)]
    except (RuntimeError, OSError) as exc:
        print(f"kvstore-server: {exc}", file=sys.stderr)
        _stop(processes)
        return 1
    for index, process in enumerate(processes):
        log.info("shard %d: pid %d on %s", index, process.pid, addresses[index])
        process.stdout.close()
    print(LISTENING + ",".join(addresses), flush=True)
    while not stopping.wait(1.0):
        if all(p.poll() is not None for p in processes):
            break
    return _stop(processes)


def _stop(processes: list[subprocess.Popen]) -> int:
    """SIGTERM to every shard still running, then wait for all; 0 only if every one exited 0."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    codes = [process.wait() for process in processes]
    for index, code in enumerate(codes):
        if code != 0:
            log.error("shard %d exited with %d", index, code)
    return next((1 for code in codes if code != 0), 0)
