"""`kvstore`: operator commands against a running server.

One argparse subparser per command and one function per subcommand, so more
commands slot in beside these. Exit codes: 0 done, 1 the server or the files
refused (the message says why) or the server is not serving, 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from kvstore_proto.export_format import ExportFormatError, ExportReader, ExportWriter

from . import replication
from .client import KVStoreClient
from .credentials import read_file
from .errors import KVStoreError
from .progress import Progress

DEFAULT_ADDRESS = "127.0.0.1:50051"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="Operate a kvstore server.")
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help=f"server host:port (default {DEFAULT_ADDRESS})")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for short calls (default 30)")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
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

    snapshot = commands.add_parser("snapshot", help="create, list, restore or delete snapshots")
    actions = snapshot.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, func, text in (("create", snapshot_create, "snapshot every table now"),
                               ("restore", snapshot_restore, "make a snapshot the live data (no downtime)"),
                               ("delete", snapshot_delete, "delete a snapshot")):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("name")
        sub.set_defaults(func=func)
    actions.add_parser("list", help="list snapshots").set_defaults(func=snapshot_list)

    export = commands.add_parser("export", help="write a table to a directory (docs/export-format.md)")
    export.add_argument("table")
    export.add_argument("path", help="a new or empty directory")
    export.set_defaults(func=export_table)

    load = commands.add_parser("import", help="load a table from an export directory")
    load.add_argument("table")
    load.add_argument("path")
    load.add_argument("--mode", choices=("merge", "replace"), default="merge",
                      help="merge: keep rows not in the export (default); replace: drop them first")
    load.set_defaults(func=import_table)
    replication.register(export, load)      # --since SEQ, sequences in manifests, chained imports
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


def snapshot_create(client: KVStoreClient, args: argparse.Namespace) -> None:
    info = client.create_snapshot(args.name)
    print(f"snapshot {info['name']}: {sum(info['rows'].values()):,} rows (estimated) in {len(info['tables'])} "
          f"tables; writes paused {1000 * info['pause_seconds']:.1f} ms, took {info['duration_seconds']:.2f} s")


def snapshot_list(client: KVStoreClient, args: argparse.Namespace) -> None:
    for info in client.list_snapshots():
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["created_at"]))
        tables = ",".join(sorted(info["rows"])) or "-"
        print(f"{info['name']}\t{created}\t{sum(info['rows'].values())}\t{tables}")


def snapshot_restore(client: KVStoreClient, args: argparse.Namespace) -> None:
    info = client.restore_snapshot(args.name)
    print(f"restored snapshot {info['name']} in {info['restore_seconds']:.2f} s")


def snapshot_delete(client: KVStoreClient, args: argparse.Namespace) -> None:
    client.delete_snapshot(args.name)
    print(f"deleted snapshot {args.name}")


def export_table(client: KVStoreClient, args: argparse.Namespace) -> None:
    stream = client.export(args.table)
    config = stream.config
    writer = ExportWriter(args.path, config, config["dim"], config["dtype"] or "float32", stream.state_dim)
    progress = Progress(f"export {args.table}", stream.estimated_rows, enabled=not args.quiet)
    for chunk in stream:
        writer.write(chunk.ids, chunk.weights, chunk.state, chunk.meta)
        progress.update(len(chunk.ids))
    manifest = writer.close()
    progress.done()
    print(f"exported {manifest['rows']:,} rows of {args.table} to {args.path}")


def import_table(client: KVStoreClient, args: argparse.Namespace) -> None:
    reader = ExportReader(args.path)
    progress = Progress(f"import {args.table}", reader.rows, enabled=not args.quiet)

    def chunks():
        for chunk in reader:
            yield chunk
            progress.update(len(chunk.ids))

    rows = client.import_chunks(args.table, chunks(), mode=args.mode, config=reader.table)
    progress.done()
    print(f"imported {rows:,} rows into {args.table} ({args.mode})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with connect(args) as client:
            return args.func(client, args) or 0
    except KVStoreError as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return 1
    except (ExportFormatError, OSError) as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
