"""The kvstore-server command line: config file, flags, bad settings."""
from __future__ import annotations

import subprocess
import sys

import pytest
from kvstore_client import KVStoreClient


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvstore_server", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("text, key", [
    ("colour: blue\n", "colour"),
    ("rocksdb:\n  block_cash_bytes: 1\n", "rocksdb.block_cash_bytes"),
])
def test_unknown_config_key_is_an_error_naming_the_key(tmp_path, text, key):
    config = tmp_path / "server.yaml"
    config.write_text(text)
    result = run_cli("--config", str(config), "--data-dir", str(tmp_path / "data"), "--port", "0")
    assert result.returncode == 2
    assert key in result.stderr and "listening" not in result.stdout


def test_bad_setting_names_the_setting(tmp_path):
    config = tmp_path / "server.yaml"
    config.write_text("max_request_rows: 0\n")
    result = run_cli("--config", str(config), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2 and "max_request_rows" in result.stderr


def test_flags_override_the_config_file(start_server, tmp_path):
    config = tmp_path / "server.yaml"
    config.write_text(f"port: 1\ndata_dir: {tmp_path / 'ignored'}\nhost: 127.0.0.1\n")
    data_dir = tmp_path / "data"
    server = start_server("--config", str(config), data_dir=data_dir)    # --port 0 and --data-dir win
    assert server.address.startswith("127.0.0.1:") and not server.address.endswith(":1")
    with KVStoreClient(server.address) as client:
        client.create_table("here", 4)
    assert (data_dir / "db").is_dir() and not (tmp_path / "ignored").exists()
