"""`kvstore`: operator commands against a running server.

One argparse subparser per command and one function per subcommand, so more
commands slot in beside these. Exit codes: 0 done, 1 the server or the files
refused (the message says why), 2 bad usage.
"""
from __future__ import annotations

import argparse
import sys
import time

from kvstore_proto.export_format import ExportFormatError, ExportReader, ExportWriter

from .client import KVStoreClient
from .errors import KVStoreError
from .progress import Progress

DEFAULT_ADDRESS = "127.0.0.1:50051"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="Operate a kvstore server.")
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help=f"server host:port (default {DEFAULT_ADDRESS})")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for short calls (default 30)")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    return parser


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
        with KVStoreClient(args.address, timeout=args.timeout) as client:
            args.func(client, args)
    except KVStoreError as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return 1
    except (ExportFormatError, OSError) as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
