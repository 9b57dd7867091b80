"""`kvstore`: operator commands against a running server.

One argparse subparser per command and one function per subcommand, so more
commands slot in beside these. Exit codes: 0 done, 1 the server refused (the
message says why) or is not serving, 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys

from .client import KVStoreClient
from .credentials import read_file
from .errors import KVStoreError

DEFAULT_ADDRESS = "127.0.0.1:50051"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="Operate a kvstore server.")
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help=f"server host:port (default {DEFAULT_ADDRESS})")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for short calls (default 30)")
    add_credential_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("tables", help="list tables").set_defaults(func=list_tables)
    describe = commands.add_parser("describe", help="a table's config as JSON")
    describe.add_argument("table")
    describe.set_defaults(func=describe_table)
    stats = commands.add_parser("stats", help="a table's counters (cache hits, rows, evictions, ...)")
    stats.add_argument("table")
    stats.add_argument("--json", action="store_true", help="one JSON object instead of name<TAB>value lines")
    stats.set_defaults(func=table_stats)
    health = commands.add_parser("health", help="the server's health status; exit 1 unless SERVING")
    health.add_argument("--service", default="", help="a service name (default: the whole server)")
    health.set_defaults(func=check_health)
    return parser


def add_credential_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token-file", help="file holding the bearer token")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's CA roots")
    parser.add_argument("--tls-ca", help="PEM CA bundle that signed the server's certificate (turns TLS on)")
    parser.add_argument("--tls-cert", help="PEM client certificate, for mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")


def connect(args: argparse.Namespace) -> KVStoreClient:
    """A client with the credentials named by the flags."""
    token = read_file(args.token_file, "--token-file").decode().strip() if args.token_file else None
    ca = read_file(args.tls_ca, "--tls-ca") if args.tls_ca else None
    cert = read_file(args.tls_cert, "--tls-cert") if args.tls_cert else None
    key = read_file(args.tls_key, "--tls-key") if args.tls_key else None
    tls = True if args.tls or ca or cert else None
    return KVStoreClient(args.address, timeout=args.timeout, token=token, root_certificates=ca,
                         certificate_chain=cert, private_key=key, tls=tls)


def list_tables(client: KVStoreClient, args: argparse.Namespace) -> int:
    for name in client.list_tables():
        print(name)
    return 0


def describe_table(client: KVStoreClient, args: argparse.Namespace) -> int:
    print(json.dumps(client.describe_table(args.table), indent=2, sort_keys=True))
    return 0


def table_stats(client: KVStoreClient, args: argparse.Namespace) -> int:
    counters = client.stats(args.table)
    if args.json:
        print(json.dumps(counters, indent=2, sort_keys=True))
    else:
        for name, value in sorted(counters.items()):
            print(f"{name}\t{value:g}")
    return 0


def check_health(client: KVStoreClient, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with connect(args) as client:
            return args.func(client, args) or 0
    except KVStoreError as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
