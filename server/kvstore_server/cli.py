"""`kvstore-server`: run one server until SIGTERM or SIGINT."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from kvstore.errors import KVStoreError

from .config import ServerConfig
from .server import KVStoreServer, grpc_address


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvstore-server", description="Serve a kvstore data directory over gRPC.")
    parser.add_argument("--config", help="YAML file with server settings (flags override it)")
    parser.add_argument("--data-dir", dest="data_dir", help="data directory (default ./kvstore-data)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    parser.add_argument("--metrics-port", dest="metrics_port", type=int, help="Prometheus port (0 = off)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {key: getattr(args, key) for key in ("data_dir", "host", "port", "metrics_port")}
    try:
        config = ServerConfig.load(args.config, overrides)
    except KVStoreError as exc:
        print(f"kvstore-server: {exc}", file=sys.stderr)
        return 2
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server = KVStoreServer(config)
    try:
        port = server.start()
    except KVStoreError as exc:
        print(f"kvstore-server: {exc}", file=sys.stderr)
        return 1
    print(f"kvstore-server listening on {grpc_address(config.host, port)}", flush=True)
    while not stopping.wait(1.0):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
