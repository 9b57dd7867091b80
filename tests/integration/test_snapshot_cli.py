"""The `kvstore` operator CLI (run as a subprocess) against a real server."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np


def kvstore(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvstore_client", "--address", server.address, *args],
                          capture_output=True, text=True, timeout=120)


def test_snapshot_commands(server, client):
    client.create_table("cli_t", 4, cache={"rows": 64, "ways": 8})
    client.update("cli_t", [1, 2], np.ones((2, 4), np.float32))
    created = kvstore(server, "snapshot", "create", "cli-1")
    assert created.returncode == 0, created.stderr
    assert "snapshot cli-1" in created.stdout and "paused" in created.stdout
    client.update("cli_t", [1, 2], np.zeros((2, 4), np.float32))
    listed = kvstore(server, "snapshot", "list")
    header, *rows = listed.stdout.splitlines()
    assert listed.returncode == 0 and header.split() == ["NAME", "CREATED", "ROWS", "TABLES"]
    assert any(row.split()[0] == "cli-1" and "cli_t" in row.split()[3] for row in rows)
    restored = kvstore(server, "snapshot", "restore", "cli-1")
    assert restored.returncode == 0, restored.stderr
    assert (client.lookup("cli_t", [1, 2], on_miss="error") == 1.0).all()
    assert kvstore(server, "snapshot", "delete", "cli-1").returncode == 0
    gone = kvstore(server, "snapshot", "delete", "cli-1")
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr and "cli-1" in gone.stderr


def test_bad_name_and_bad_usage_exit_codes(server):
    bad = kvstore(server, "snapshot", "create", "../escape")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "name" in bad.stderr
    usage = kvstore(server, "snapshot", "rename", "x")
    assert usage.returncode == 2


def test_export_then_import_into_a_new_table(server, client, tmp_path):
    client.create_table("cli_src", 4, optimizer={"name": "rowwise_adagrad"}, cache={"rows": 64, "ways": 8})
    ids = np.arange(5000) * 13
    weights = np.random.default_rng(0).standard_normal((5000, 4)).astype(np.float32)
    client.update("cli_src", ids, weights, np.full((5000, 1), 0.5, np.float32))
    path = tmp_path / "export"
    exported = kvstore(server, "export", "cli_src", str(path))
    assert exported.returncode == 0, exported.stderr
    assert "5,000 rows" in exported.stdout and "rows/s" in exported.stderr and "\r" not in exported.stderr
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["rows"] == 5000 and manifest["sorted"]
    assert manifest["table"]["optimizer"]["name"] == "rowwise_adagrad"
    imported = kvstore(server, "import", "cli_copy", str(path), "--mode", "replace")
    assert imported.returncode == 0, imported.stderr
    copy = client.export_table("cli_copy")
    assert (copy.ids == ids).all() and copy.weights.tobytes() == weights.tobytes() and (copy.state == 0.5).all()
    again = kvstore(server, "export", "cli_src", str(path))
    assert again.returncode == 1 and "already holds an export" in again.stderr
    missing = kvstore(server, "import", "cli_copy", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "manifest.json" in missing.stderr
