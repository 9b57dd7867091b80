"""Nothing under the data directory may lead out of it through a symbolic link.

A link planted in the data directory (by another local user, or a restore of a
tampered backup) would make the server read a snapshot from elsewhere, write a
database, a snapshot or staged import files outside, or delete files it does not
own. The server refuses to start on a data directory holding such a link (one line
naming it), and before each call that reads or writes paths in it (snapshots, restore,
import staging) checks them again: FAILED_PRECONDITION naming the link. Links that
stay inside the data directory are allowed, and so is a data directory that is
itself a link (the operator's choice of disk).
"""
from __future__ import annotations

import os

from kvstore.config import validate_name
from kvstore.errors import FailedPrecondition

SNAPSHOTS_DIR = "snapshots"       # kvstore.snapshots.SNAPSHOTS_DIR
STAGING_DIR = "staging"           # kvstore.store.STAGING_DIR


def check_staging(data_dir: str) -> None:
    """Before an import stages files: the staging directory."""
    check_inside(data_dir, STAGING_DIR, deep=False)


def _escape(root: str, path: str) -> str | None:
    """Where `path` really leads, when that is outside the real `root`; None when it stays inside."""
    real = os.path.realpath(path)
    return None if os.path.commonpath([root, real]) == root else real


def check_inside(data_dir: str, relative: str, deep: bool = True) -> None:
    """FailedPrecondition when the path `relative` under `data_dir` (through any link on its way) or,
    when `deep`, a link anywhere below it leads outside `data_dir`. A missing path is fine."""
    root = os.path.realpath(data_dir)
    path = os.path.join(data_dir, relative)
    for where in _links(path) if deep else (path,):
        outside = _escape(root, where)
        if outside is not None:
            raise FailedPrecondition(
                f"data_dir: {os.path.relpath(where, data_dir)} leads outside the data directory (to {outside}) "
                "through a symbolic link; refusing to follow it. Remove the link")


def _links(path: str):
    """`path` itself (its real path resolves any link above it too) and every link below it."""
    yield path
    if not os.path.isdir(path) or os.path.islink(path):
        return
    for directory, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            entry = os.path.join(directory, name)
            if os.path.islink(entry):
                yield entry


def check_data_dir(data_dir: str) -> None:
    """At start: every entry of the data directory, the database directories included."""
    if os.path.isdir(data_dir):
        check_inside(data_dir, "")


def check_snapshot(data_dir: str, name: str = "") -> None:
    """Before a snapshot is made, restored or deleted: the snapshots directory and the snapshot's tree
    (a name that is not a valid one is refused first: no path is made of it)."""
    if name:
        validate_name(name, "name")
    check_inside(data_dir, SNAPSHOTS_DIR, deep=False)
    if name:
        check_inside(data_dir, os.path.join(SNAPSHOTS_DIR, os.path.basename(name)))
