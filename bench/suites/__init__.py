"""The suites, named after what users do. Each `run(ctx)` returns the records it also logged."""
from __future__ import annotations

import importlib

SUITES = ("lookup", "train", "ingest", "snapshot", "export", "mixed")


def runner(name: str):
    return importlib.import_module(f"{__name__}.{name}").run
