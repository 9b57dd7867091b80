"""`kvstore-server`: run one server until SIGTERM or SIGINT.

Every config key is also a flag (`max_workers` -> `--max-workers`, `rocksdb.durability`
-> `--rocksdb-durability`); flags win over `KVSTORE_*` variables, which win over
the YAML file. `--print-config` prints the effective config and exits.

Start-up output: one "listening" log record in the configured format on stderr,
and for scripts the line `kvstore-server listening on HOST:PORT` on stdout (left
out when stdout and stderr are the same file, as on a terminal, where the log
record says it already). gRPC's own C-core log lines are off unless
GRPC_VERBOSITY is set: they would bypass the configured format. A port that
cannot be bound fails before the store opens, in one line, creating nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import shutil
import signal
import socket
import sys

from kvstore.errors import FailedPrecondition, InvalidArgument, KVStoreError

from .allocator import keep_freed_memory
from .cluster_service import check_shard_index, shard_index_of
from .config import ENV_CONFIG, ServerConfig, parse_value, resolve, settable_keys, to_yaml
from .event_loop import run_event_loop
from .shards import run_shards

log = logging.getLogger("kvstore_server")
HELP = {
    "data_dir": "data directory (default ./kvstore-data)",
    "host": "address to bind (default 127.0.0.1)",
    "port": "gRPC port (default 50051; 0 = any free port)",
    "metrics_port": "Prometheus port (0 = off)",
    "auth_token_file": "file holding the bearer token every RPC but health must present",
    "tls_cert": "PEM certificate chain (TLS on; needs --tls-key)",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle: clients must present a certificate it signed (mutual TLS)",
    "log_format": "text or json (one JSON object per line)",
    "rocksdb.durability": "wal (default: acknowledged writes survive kill -9 as each table's write mode promises), "
                          "sync (also fsync before the reply: survives power loss), or none (no WAL: a crash "
                          "loses every row written since RocksDB last flushed its memtables to SST files, "
                          "up to write_buffer_bytes per table, even rows the server had written back)",
    "replica_of": "primary host:port: serve as its read-only replica (docs/replication.md)",
    "rocksdb.read_threads": "threads for large multi-gets from RocksDB (default: 4, or the CPUs this process may "
                            "use where fewer; docs/operations.md)",
    "cache_device": "cache of tables created without cache.device: cpu (default), cuda or cuda:N; a device "
                    "this machine lacks stops the server at start",
}


def _flag(key: str) -> str:
    return "--" + key.replace(".", "-").replace("_", "-")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kvstore-server", description="Serve a kvstore data directory over gRPC.",
        epilog=f"Precedence: flags > KVSTORE_* environment variables > the YAML file (--config or {ENV_CONFIG}) "
               "> defaults.")
    parser.add_argument("--config", help="YAML file with server settings (variables and flags override it)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective config as YAML, with where each value came from, and exit")
    parser.add_argument("--shards", type=int, metavar="N",
                        help="start N shard servers: ports PORT..PORT+N-1, data dirs DATA_DIR/shard-i "
                             "(docs/scale-out.md)")
    parser.add_argument("--shard-index", metavar="I",
                        help="this server's shard index, or a StatefulSet pod name (kvstore-3): refuse to start "
                             "on a data dir that holds another shard")
    defaults = ServerConfig().to_dict()
    for key in settable_keys():
        outer, _, inner = key.partition(".")
        default = defaults[outer][inner] if inner else defaults[key]
        parser.add_argument(_flag(key), dest=key, metavar=key.rsplit(".", 1)[-1].upper(),
                            help=HELP.get(key, f"config key {key} (default {default!r}; docs/operations.md)"))
    return parser.parse_args(argv)


def check_bindable(host: str, port: int) -> None:
    """Fail early, with the reason in plain words, when `host:port` cannot be bound
    (gRPC's own error only says to turn on debug logs)."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # as gRPC binds
            probe.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason += " (another process listens there: stop it or pick another --port)"
        raise FailedPrecondition(f"port: cannot bind {host}:{port}: {reason}") from None


def _same_file(first, second) -> bool:
    try:
        return os.path.samestat(os.fstat(first.fileno()), os.fstat(second.fileno()))
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")     # read once, when grpc loads below
    from .logs import configure

    args = parse_args(argv)
    try:
        flags = {key: None if getattr(args, key) is None else parse_value(getattr(args, key), kind, _flag(key))
                 for key, kind in settable_keys().items()}
        config, sources = resolve(args.config, flags, os.environ)
    except KVStoreError as exc:
        print(f"kvstore-server: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(to_yaml(config, sources))
        return 0
    configure(config.log_format, config.log_level)
    try:
        if args.shards is not None:
            return run_shards(config, sys.argv[1:] if argv is None else argv, args.shards)
        if args.shard_index is not None:
            check_shard_index(config.data_dir, shard_index_of(args.shard_index))
    except KVStoreError as exc:
        print(f"kvstore-server: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidArgument) else 1
    os.umask(0o077)          # the data directory and everything in it: private to the server's user
    keep_freed_memory()
    try:
        return run_event_loop(serve(config), config.event_loop)
    except KVStoreError as exc:
        print(f"kvstore-server: {exc}", file=sys.stderr)
        return 1


async def serve(config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT, then drain and close; the process's exit code."""
    from .security import exposure_warnings
    from .server import KVStoreServer, grpc_address

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    server = KVStoreServer(config)
    created = not os.path.exists(config.data_dir)
    try:
        check_bindable(config.host, config.port)
        port = await server.start()
    except KVStoreError as exc:
        if created:
            shutil.rmtree(config.data_dir, ignore_errors=True)     # nothing of a server that never ran stays
        print(f"kvstore-server: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidArgument) else 1
    for warning in exposure_warnings(config):
        log.warning("%s", warning)
    address = grpc_address(config.host, port)
    log.info("kvstore-server listening on %s (data dir %s, tls=%s, auth=%s, metrics port %s)", address,
             config.data_dir, "mutual" if config.tls_client_ca else config.tls, bool(config.auth_token_file),
             config.metrics_port)
    if not _same_file(sys.stdout, sys.stderr):
        print(f"kvstore-server listening on {address}", flush=True)
    await stopping.wait()
    await server.stop()
    return 0

if __name__ == "__main__":
    sys.exit(main())
