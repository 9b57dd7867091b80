"""Fixtures of the operations tests: real servers (see tests/integration/conftest.py), scraping, promtool."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from integration.conftest import ServerProcess, free_port, start_server, wait_until  # noqa: F401 - fixtures
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian/Ubuntu package `prometheus`; .ci/run installs it)",
)


def scrape(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value of one exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def value(text_or_samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    parsed = samples(text_or_samples) if isinstance(text_or_samples, str) else text_or_samples
    return parsed.get((name, frozenset(labels.items())), 0.0)


def private_token_file(directory: Path, token: str) -> Path:
    """`directory`/token holding `token`, mode 0600 (as the server requires)."""
    path = directory / "token"
    path.write_text(token)
    path.chmod(0o600)
    return path


def run_cli(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    """`python -m <module> args` with the environment `env` (defaults to a copy without KVSTORE_*)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=environ)
