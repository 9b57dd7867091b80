"""Snapshots on disk, and the pointer that names the live database.

Layout of a data directory:

    LIVE                      name of the live database directory ("db" when absent)
    db/ or db-<n>/            the live database
    snapshots/<name>/db/      a RocksDB checkpoint (hard links to SST files)
    snapshots/<name>/manifest.json

A snapshot is built under a hidden temporary name and renamed into place, so a
crash never leaves a half-made snapshot under a valid name. A restore copies a
snapshot into a fresh `db-<n>` (hard-linking SST files, which RocksDB never
modifies) and then replaces LIVE atomically, so a restart opens what was live.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from .config import validate_name
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, StorageError

SNAPSHOT_FORMAT = 1
LIVE_FILE = "LIVE"
DEFAULT_DB = "db"
SNAPSHOTS_DIR = "snapshots"
MANIFEST = "manifest.json"
_DB_NAME = re.compile(r"db(-[0-9]+)?")


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    created_at: float                       # unix seconds
    tables: dict[str, dict[str, Any]]       # name -> table config
    rows: dict[str, int]                    # name -> estimated rows at the cut
    format_version: int = SNAPSHOT_FORMAT
    pause_seconds: float = 0.0              # writes were held back this long
    duration_seconds: float = 0.0           # the whole call, flush and manifest included
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "name": self.name, "created_at": self.created_at,
            "tables": self.tables, "rows": self.rows, "pause_seconds": self.pause_seconds,
            "duration_seconds": self.duration_seconds, **self.extra,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SnapshotInfo:
        known = ("name", "created_at", "tables", "rows", "format_version", "pause_seconds", "duration_seconds")
        return cls(**{k: raw[k] for k in known if k in raw},
                   extra={k: v for k, v in raw.items() if k not in known})


def _storage_error(what: str, exc: OSError) -> FailedPrecondition:
    """A file-system failure around snapshots (unwritable or full disk): the operator must act."""
    return FailedPrecondition(f"{what}: {exc.strerror or exc} ({exc.filename or ''})")


def write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotDir:
    """Names, manifests and files of the snapshots of one data directory."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.root = os.path.join(data_dir, SNAPSHOTS_DIR)

    def path(self, name: str) -> str:
        return os.path.join(self.root, validate_name(name, "name"))

    def exists(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.path(name), MANIFEST))

    def prepare(self, name: str) -> str:
        """Check the name is free and make an empty temporary directory for the new snapshot."""
        target = self.path(name)
        if os.path.lexists(target):
            raise AlreadyExists(f"name: snapshot {name!r} already exists")
        tmp = os.path.join(self.root, f".tmp-{name}-{os.getpid()}")
        if os.path.lexists(self.root) and not os.path.isdir(self.root):
            raise FailedPrecondition(f"name: cannot create snapshot {name!r}: {self.root} is not a directory")
        try:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.mkdir(tmp)
        except OSError as exc:
            raise _storage_error(f"name: cannot create snapshot {name!r} under {self.root}", exc) from None
        return tmp

    def publish(self, tmp: str, info: SnapshotInfo) -> None:
        try:
            write_atomically(os.path.join(tmp, MANIFEST), json.dumps(info.to_dict(), indent=2))
            os.rename(tmp, self.path(info.name))
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _storage_error(f"name: cannot write snapshot {info.name!r}", exc) from None

    def info(self, name: str) -> SnapshotInfo:
        try:
            with open(os.path.join(self.path(name), MANIFEST)) as src:
                return SnapshotInfo.from_dict(json.load(src))
        except FileNotFoundError:
            raise NotFound(f"name: no snapshot named {name!r}") from None
        except (OSError, ValueError) as exc:
            raise StorageError(f"name: manifest of snapshot {name!r} is unreadable: {exc}") from None

    def list(self) -> list[SnapshotInfo]:
        if not os.path.isdir(self.root):
            return []
        names = sorted(n for n in os.listdir(self.root) if not n.startswith(".") and self._valid(n))
        return [self.info(n) for n in names if self.exists(n)]

    @staticmethod
    def _valid(name: str) -> bool:
        try:
            validate_name(name)
            return True
        except InvalidArgument:
            return False

    def delete(self, name: str) -> None:
        if not self.exists(name):
            raise NotFound(f"name: no snapshot named {name!r}")
        target = self.path(name)
        trash = os.path.join(self.root, f".del-{name}-{time.time_ns()}")
        try:
            os.rename(target, trash)        # the name is free at once; files go after
        except OSError as exc:
            raise _storage_error(f"name: cannot delete snapshot {name!r}", exc) from None
        shutil.rmtree(trash, ignore_errors=True)

    # --- the live database ------------------------------------------------

    def live_db(self) -> str:
        try:
            with open(os.path.join(self.data_dir, LIVE_FILE)) as src:
                name = src.read().strip()
        except FileNotFoundError:
            return DEFAULT_DB
        if not _DB_NAME.fullmatch(name):
            raise StorageError(f"{LIVE_FILE}: names {name!r}, not a database directory")
        return name

    def next_db(self) -> str:
        used = [int(n[3:]) for n in os.listdir(self.data_dir) if _DB_NAME.fullmatch(n) and n != DEFAULT_DB]
        return f"db-{max(used, default=0) + 1}"

    def copy_to_db(self, name: str) -> str:
        """A private copy of a snapshot's database as a new `db-<n>` directory; returns its name."""
        source = os.path.join(self.path(name), "db")
        if not self.exists(name):
            raise NotFound(f"name: no snapshot named {name!r}")
        db_name = self.next_db()
        tmp = os.path.join(self.data_dir, f".{db_name}.tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp, copy_function=_link_or_copy)
            os.rename(tmp, os.path.join(self.data_dir, db_name))
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _storage_error(f"name: cannot copy snapshot {name!r} for restore", exc) from None
        return db_name

    def set_live(self, db_name: str) -> None:
        try:
            write_atomically(os.path.join(self.data_dir, LIVE_FILE), db_name + "\n")
        except OSError as exc:
            raise _storage_error(f"{LIVE_FILE}: cannot switch the live database", exc) from None

    def remove_stale(self, live: str) -> None:
        """Remove leftovers of interrupted work: temporary snapshot/restore dirs and dead databases."""
        for entry in os.listdir(self.data_dir):
            dead_db = _DB_NAME.fullmatch(entry) and entry != live
            if dead_db or (entry.startswith(".db-") and entry.endswith(".tmp")):
                shutil.rmtree(os.path.join(self.data_dir, entry), ignore_errors=True)
        if os.path.isdir(self.root):
            for entry in os.listdir(self.root):
                if entry.startswith((".tmp-", ".del-")):
                    shutil.rmtree(os.path.join(self.root, entry), ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    """SST files are immutable: share them by hard link; copy everything else (RocksDB edits those)."""
    if src.endswith(".sst"):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)
