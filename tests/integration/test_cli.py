"""The kvstore-server command line: config file, flags, bad settings."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import pytest
from kvstore_client import KVStoreClient

from .conftest import wait_until


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


def test_server_starts_with_the_clients_variables_in_its_environment(start_server, monkeypatch):
    from kvstore_client.cli import ENVIRONMENT
    from kvstore_server.config import CLIENT_VARIABLES, settable_keys

    assert set(ENVIRONMENT) == CLIENT_VARIABLES
    server_variables = {"KVSTORE_" + key.replace(".", "_").upper() for key in settable_keys()}
    assert not CLIENT_VARIABLES & server_variables
    for name in CLIENT_VARIABLES:
        monkeypatch.setenv(name, "/nowhere/such-a-file" if "FILE" in name or "CA" in name else "x:1")
    server = start_server()            # the process inherits them
    with KVStoreClient(server.address) as client:
        assert client.health() == "SERVING"
    monkeypatch.setenv("KVSTORE_ADRESS", "127.0.0.1:1")     # a typo is still an error naming it
    typo = run_cli("--data-dir", "unused", "--print-config")
    assert typo.returncode == 2 and "KVSTORE_ADRESS" in typo.stderr


def _start_into(log, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvstore_server", "--port", "0", *args], stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def test_listening_is_logged_once_in_the_configured_format(tmp_path):
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = _start_into(log, "--data-dir", str(tmp_path / "data"), "--log-format", "json")
    try:
        assert wait_until(lambda: "listening" in log_path.read_text(), timeout=60)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    lines = log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]          # every line is one JSON record: nothing else leaked
    listening = [r for r in records if "listening on 127.0.0.1:" in r["message"]]
    assert len(listening) == 1 and lines[0] == json.dumps(listening[0])


def test_listening_line_on_stdout_for_scripts_and_one_record_on_stderr(start_server):
    server = start_server()            # the fixture reads the address from stdout
    records = [line for line in server.log.read_text().splitlines() if "listening" in line]
    assert len(records) == 1 and server.address in records[0]


def test_failed_bind_is_one_line_and_creates_no_data_directory(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data_dir = tmp_path / "new" / "data"
        result = run_cli("--data-dir", str(data_dir), "--port", str(port))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("kvstore-server: port: cannot bind")
    assert "already in use" in result.stderr.lower()
    assert not data_dir.exists() and not data_dir.parent.exists()
