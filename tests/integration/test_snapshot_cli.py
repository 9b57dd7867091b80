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


def damage_chunk(path, name: str) -> None:
    chunk = path / name
    with open(chunk, "r+b") as f:
        f.seek(chunk.stat().st_size // 2)             # rows, not the layout: found by the checksum alone
        f.write(b"\x00\x01\x02")


def test_import_of_an_export_whose_last_file_is_damaged_fails_and_changes_nothing(server, client, tmp_path):
    client.create_table("cli_dmg", 4, cache={"rows": 64, "ways": 8})
    ids = np.arange(3000) * 7
    weights = np.random.default_rng(1).standard_normal((3000, 4)).astype(np.float32)
    client.update("cli_dmg", ids, weights)
    path = tmp_path / "export"
    assert kvstore(server, "export", "cli_dmg", str(path)).returncode == 0
    last = json.loads((path / "manifest.json").read_text())["chunks"][-1]["file"]
    damage_chunk(path, last)
    client.update("cli_dmg", ids, weights + 1)
    for table in ("cli_dmg", "cli_dmg_new"):
        failed = kvstore(server, "import", table, str(path), "--mode", "replace")
        assert failed.returncode == 1 and f"{last}: checksum" in failed.stderr, failed.stderr
    assert client.export_table("cli_dmg").weights.tobytes() == (weights + 1).tobytes()
    assert "cli_dmg_new" not in client.list_tables()


def test_import_of_several_files_with_a_damaged_one_fails_and_creates_nothing(server, client, tmp_path):
    from kvstore_proto.export_format import ExportWriter

    path = tmp_path / "export"
    writer = ExportWriter(str(path), {"name": "cli_many", "dim": 4}, dim=4, dtype="float32", state_dim=0,
                          file_bytes=8192)
    for start in range(0, 1200, 300):
        writer.write(np.arange(start, start + 300), np.ones((300, 4), np.float32), np.zeros((300, 0), np.float32),
                     np.zeros((300, 3), np.uint32))
    names = [entry["file"] for entry in writer.close()["chunks"]]
    assert len(names) > 2
    damage_chunk(path, names[-1])
    failed = kvstore(server, "import", "cli_many", str(path))
    assert failed.returncode == 1 and f"{names[-1]}: checksum" in failed.stderr, failed.stderr
    assert "cli_many" not in client.list_tables()
