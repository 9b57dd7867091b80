"""`kvstore-server`: run one server until SIGTERM or SIGINT.

Every config key is also a flag (`max_workers` -> `--max-workers`, `rocksdb.durability`
-> `--rocksdb-durability`); flags win over `KVSTORE_*` variables, which win over
the YAML file. `--print-config` prints the effective config and exits.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from kvstore.errors import InvalidArgument, KVStoreError

from .allocator import keep_freed_memory
from .config import ENV_CONFIG, ServerConfig, parse_value, resolve, settable_keys, to_yaml
from .logs import configure
from .server import KVStoreServer, grpc_address

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
    "replica_of": "primary host:port: serve as its read-only replica (docs/replication.md)",
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
    defaults = ServerConfig().to_dict()
    for key in settable_keys():
        outer, _, inner = key.partition(".")
        default = defaults[outer][inner] if inner else defaults[key]
        parser.add_argument(_flag(key), dest=key, metavar=key.rsplit(".", 1)[-1].upper(),
                            help=HELP.get(key, f"config key {key} (default {default!r}; docs/operations.md)"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
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
    keep_freed_memory()
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server = KVStoreServer(config)
    try:
        port = server.start()
    except KVStoreError as exc:
        print(f"kvstore-server: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidArgument) else 1
    log.info("listening on %s (tls=%s, auth=%s, metrics port %s)", grpc_address(config.host, port),
             "mutual" if config.tls_client_ca else config.tls, bool(config.auth_token_file), config.metrics_port)
    print(f"kvstore-server listening on {grpc_address(config.host, port)}", flush=True)
    while not stopping.wait(1.0):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
