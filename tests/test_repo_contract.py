"""Promises of the repository itself: the README's commands, generated code, import boundaries, lint."""
from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) >= 2
    server, tests = commands[0], commands[1]
    assert "kvstore-server" in server and "pytest" in tests
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def test_generated_protobuf_code_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc produced nothing"
    for rel in generated:
        checked_in = ROOT / "protos" / rel
        assert checked_in.exists() and filecmp.cmp(tmp_path / rel, checked_in, shallow=False), (
            f"{rel} is stale: run python protos/generate.py"
        )


def test_import_boundaries_hold():
    """The client never imports the store; the store never imports gRPC (import-linter contracts)."""
    pytest.importorskip("importlinter")
    result = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_tree_passes_its_linter():
    """`ruff check` with the settings in pyproject.toml (style and likely bugs) finds nothing."""
    pytest.importorskip("ruff")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
