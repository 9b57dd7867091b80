"""`kvstore`: operator commands against a running server.

One argparse subparser per command and one function per subcommand, so more
commands slot in beside these. Exit codes: 0 done, 1 the server or the files
refused (the message says why) or the server is not serving, 2 bad usage,
141 stdout closed early (`kvstore tables | head`), 130 interrupted.

The connection settings also come from the environment (the flag wins), so a
shell can set them once. These names are the client's own: a `kvstore-server`
started from the same shell ignores them.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from kvstore_proto.export_format import ExportFormatError

from . import commands, replication
from .client import KVStoreClient
from .credentials import read_file
from .errors import InvalidArgumentError, KVStoreError
from .reshard import add_reshard_command
from .transfer_commands import export_table, import_table

DEFAULT_ADDRESS = "127.0.0.1:50051"
# variable -> what it sets; `kvstore_server.config.CLIENT_VARIABLES` lists the same names
ENVIRONMENT = {
    "KVSTORE_ADDRESS": "server host:port, as --address",
    "KVSTORE_TOKEN_FILE": "file holding the bearer token, as --token-file",
    "KVSTORE_TOKEN": "the bearer token itself (when no token file is named)",
    "KVSTORE_TLS_CA": "PEM CA bundle of the server's certificate, as --tls-ca (turns TLS on)",
}
EXIT_BROKEN_PIPE = 141           # 128 + SIGPIPE, what `yes | head` reports


def build_parser() -> argparse.ArgumentParser:
    epilog = "environment (a flag wins over its variable):\n" + "\n".join(
        f"  {name:<20}{text}" for name, text in ENVIRONMENT.items())
    parser = argparse.ArgumentParser(prog="kvstore", description="Operate a kvstore server.", epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help=f"server host:port (default $KVSTORE_ADDRESS, else {DEFAULT_ADDRESS})")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for short calls (default 30)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_credential_flags(parser)
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tables = subcommands.add_parser("tables", help="list tables with their dim, dtype, optimizer and cache")
    _json_flag(tables, "a JSON list of full table configs")
    tables.set_defaults(func=commands.list_tables)
    describe = subcommands.add_parser("describe", help="a table's config as JSON")
    describe.add_argument("table")
    describe.set_defaults(func=commands.describe_table)
    stats = subcommands.add_parser("stats", help="a table's counters (cache hits, rows, evictions, ...)")
    stats.add_argument("table")
    _json_flag(stats, "one JSON object instead of name<TAB>value lines")
    stats.set_defaults(func=commands.table_stats)
    health = subcommands.add_parser("health", help="the server's health status; exit 1 unless SERVING")
    health.add_argument("--service", default="", help="a service name (default: the whole server)")
    health.set_defaults(func=commands.check_health)

    snapshot = subcommands.add_parser("snapshot", help="create, list, restore or delete snapshots")
    actions = snapshot.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, func, text in (("create", commands.snapshot_create, "snapshot every table now"),
                               ("restore", commands.snapshot_restore, "make a snapshot the live data (no downtime)"),
                               ("delete", commands.snapshot_delete, "delete a snapshot")):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("name")
        sub.set_defaults(func=func)
    listing = actions.add_parser("list", help="list snapshots: name, creation time, rows, tables")
    _json_flag(listing, "a JSON list of snapshots")
    listing.set_defaults(func=commands.snapshot_list)

    export = subcommands.add_parser("export", help="write a table to a directory (docs/export-format.md)")
    export.add_argument("table")
    export.add_argument("path", help="a new or empty directory")
    export.set_defaults(func=export_table)

    load = subcommands.add_parser("import", help="load a table from an export directory")
    load.add_argument("table")
    load.add_argument("path")
    load.add_argument("--mode", choices=("merge", "replace"), default="merge",
                      help="merge: keep rows not in the export (default); replace: drop them first")
    load.set_defaults(func=import_table)
    add_reshard_command(subcommands)          # scale-out: reshard.py
    replication.register(export)            # --since SEQ; sequences in manifests, chained imports
    return parser


def _json_flag(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--json", action="store_true", help=text)


def add_credential_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token-file", help="file holding the bearer token (default $KVSTORE_TOKEN_FILE)")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's CA roots")
    parser.add_argument("--tls-ca", help="PEM CA bundle that signed the server's certificate (turns TLS on; "
                                         "default $KVSTORE_TLS_CA)")
    parser.add_argument("--tls-cert", help="PEM client certificate, for mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--insecure", action="store_true",
                        help="send the bearer token to another machine without TLS (refused otherwise)")


def connect(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> KVStoreClient:
    """A client for the address and credentials named by the flags, else by the environment."""
    address = args.address or environ.get("KVSTORE_ADDRESS") or DEFAULT_ADDRESS
    token_file = args.token_file or environ.get("KVSTORE_TOKEN_FILE")
    ca_file = args.tls_ca or environ.get("KVSTORE_TLS_CA")
    if token_file:
        where = "--token-file" if args.token_file else "KVSTORE_TOKEN_FILE"
        token = read_file(token_file, where).decode().strip()
    else:
        token = environ.get("KVSTORE_TOKEN", "").strip() or None
    ca = read_file(ca_file, "--tls-ca" if args.tls_ca else "KVSTORE_TLS_CA") if ca_file else None
    cert = read_file(args.tls_cert, "--tls-cert") if args.tls_cert else None
    key = read_file(args.tls_key, "--tls-key") if args.tls_key else None
    tls = True if args.tls or ca or cert else None
    if not address.strip():
        raise InvalidArgumentError(message="address: empty (--address or KVSTORE_ADDRESS)")
    return KVStoreClient(address, timeout=args.timeout, token=token, root_certificates=ca,
                         certificate_chain=cert, private_key=key, tls=tls, insecure=args.insecure)


def _quiet_stdout() -> None:
    """After the reader of stdout left: send what is still buffered nowhere, so the
    interpreter's final flush does not print a second error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with connect(args) as client:
            code = args.func(client, args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except (KVStoreError, ExportFormatError, OSError) as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
