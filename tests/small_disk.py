"""A real small filesystem for full-disk tests: a tmpfs mounted for one test, and a filler file
that takes every free byte of it. Tests using it skip where tmpfs cannot be mounted (not root)."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted(path: Path, size: str = "24m"):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> None:
    """Take every free byte of the filesystem (ever smaller writes until none fits)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 64 << 10, 4 << 10, 512):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\1" * size):
                    pass
    finally:
        os.close(fd)


def free(disk: Path) -> None:
    os.remove(disk / "filler")
