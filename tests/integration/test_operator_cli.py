"""The `kvstore` command's manners, against a real server: address and token from the
environment, headers and --json, empty listings, integers, a closed stdout, progress output."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys

import numpy as np
import pytest

from .conftest import free_port, small_table


def kvstore(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m kvstore_client ARGS` with no KVSTORE_* variable but those of `env`."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    environ.update(env or {})
    kwargs.setdefault("capture_output", True)
    return subprocess.run([sys.executable, "-m", "kvstore_client", *args], text=True, timeout=120, env=environ,
                          **kwargs)


def at(server, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return kvstore("--address", server.address, *args, **kwargs)


@pytest.fixture(scope="module")
def empty_server(start_server):
    return start_server()


def test_address_comes_from_KVSTORE_ADDRESS(server, client):
    small_table(client, "env_t", dim=4)
    result = kvstore("tables", env={"KVSTORE_ADDRESS": server.address})
    assert result.returncode == 0, result.stderr
    assert "env_t" in result.stdout.split()


def test_address_flag_wins_over_KVSTORE_ADDRESS(server):
    nowhere = f"127.0.0.1:{free_port()}"
    assert kvstore("--address", server.address, "health", env={"KVSTORE_ADDRESS": nowhere}).stdout == "SERVING\n"
    refused = kvstore("--timeout", "2", "tables", env={"KVSTORE_ADDRESS": nowhere})
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr


def test_token_comes_from_KVSTORE_TOKEN_FILE_or_KVSTORE_TOKEN(start_server, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-of-the-operator\n")
    token.chmod(0o600)
    guarded = start_server("--auth-token-file", str(token))
    env = {"KVSTORE_ADDRESS": guarded.address}
    refused = kvstore("tables", env=env)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    assert kvstore("tables", env={**env, "KVSTORE_TOKEN_FILE": str(token)}).returncode == 0
    assert kvstore("tables", env={**env, "KVSTORE_TOKEN": "s3cret-token-of-the-operator"}).returncode == 0
    missing = kvstore("tables", env={**env, "KVSTORE_TOKEN_FILE": str(tmp_path / "absent")})
    assert missing.returncode == 1 and "KVSTORE_TOKEN_FILE" in missing.stderr


def test_empty_listings_say_so_on_stderr_and_print_nothing(empty_server):
    tables = at(empty_server, "tables")
    assert tables.returncode == 0 and tables.stdout == "" and tables.stderr.strip() == "no tables"
    snapshots = at(empty_server, "snapshot", "list")
    assert snapshots.returncode == 0 and snapshots.stdout == "" and snapshots.stderr.strip() == "no snapshots"
    assert json.loads(at(empty_server, "tables", "--json").stdout) == []
    assert json.loads(at(empty_server, "snapshot", "list", "--json").stdout) == []


def test_tables_have_a_header_and_json_for_scripts(server, client):
    small_table(client, "listed_t", dim=12, optimizer={"name": "adagrad"})
    result = at(server, "tables")
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "DIM", "DTYPE", "OPTIMIZER", "CACHE_ROWS", "CACHE_POLICY", "WRITE", "DEVICE",
                              "HOST_ROWS"]
    assert (["listed_t", "12", "float32", "adagrad", "256", "lru", "write_back", "cpu", "-"]
            in [row.split() for row in rows])
    configs = {c["name"]: c for c in json.loads(at(server, "tables", "--json").stdout)}
    assert configs["listed_t"]["dim"] == 12 and configs["listed_t"]["optimizer"]["name"] == "adagrad"
    assert configs["listed_t"]["cache"]["device"] == "cpu" and "host_rows" not in configs["listed_t"]["cache"]


def test_snapshot_list_json_for_scripts(server, client):
    small_table(client, "snap_json_t", dim=4)
    client.update("snap_json_t", [1, 2, 3], np.ones((3, 4), np.float32))
    assert at(server, "snapshot", "create", "json-1").returncode == 0
    listed = {s["name"]: s for s in json.loads(at(server, "snapshot", "list", "--json").stdout)}
    assert "snap_json_t" in listed["json-1"]["tables"] and isinstance(listed["json-1"]["created_at"], float)
    assert at(server, "snapshot", "delete", "json-1").returncode == 0


def test_stats_prints_whole_counters_as_integers(server, client):
    small_table(client, "stats_t", dim=4)
    client.update("stats_t", np.arange(1_000_000, 1_000_000 + 2000), np.ones((2000, 4), np.float32))
    lines = dict(line.split("\t") for line in at(server, "stats", "stats_t").stdout.splitlines())
    assert lines["rows_updated"] == "2000" and lines["cache_capacity"] == "256"
    assert all("e+" not in value for value in lines.values())
    counters = json.loads(at(server, "stats", "stats_t", "--json").stdout)
    assert counters["rows_updated"] == 2000 and isinstance(counters["rows_updated"], int)


def test_closed_stdout_exits_quietly_with_141(server, client):
    small_table(client, "pipe_t", dim=4)
    read_end, write_end = os.pipe()
    os.close(read_end)                         # the reader is gone before the first byte, as `| head -0`
    try:
        result = at(server, "describe", "pipe_t", stdout=write_end, stderr=subprocess.PIPE, capture_output=False)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == ""


def test_describe_into_head_is_quiet(server, client):
    small_table(client, "head_t", dim=4)
    shell = f"{sys.executable} -m kvstore_client --address {server.address} describe head_t | head -c 1"
    result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "{" and result.stderr == ""


def test_export_progress_in_a_log_is_plain_lines_ending_with_one_summary(server, client, tmp_path):
    small_table(client, "progress_t", dim=4)
    client.update("progress_t", np.arange(3000), np.ones((3000, 4), np.float32))
    result = at(server, "export", "progress_t", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    summaries = [line for line in result.stderr.splitlines() if "in all" in line]
    assert len(summaries) == 1 and summaries[0].startswith("export progress_t: 3,000 rows, ")
    assert "rows/s" in summaries[0] and "MiB/s" in summaries[0]
    quiet = at(server, "--quiet", "import", "progress_copy", str(tmp_path / "out"))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_export_progress_on_a_terminal_is_a_bar(server, client, tmp_path):
    pytest.importorskip("rich")
    small_table(client, "bar_t", dim=4)
    client.update("bar_t", np.arange(3000), np.ones((3000, 4), np.float32))
    code, drawn = on_a_terminal("--address", server.address, "export", "bar_t", str(tmp_path / "out"),
                                env={"COLUMNS": "120", "TERM": "xterm"})
    assert code == 0
    assert "\x1b[" in drawn                      # drawn in place with terminal control codes
    assert drawn.count("in all") == 1 and "export bar_t: 3,000 rows" in drawn


def test_without_rich_a_terminal_gets_plain_lines(server, client, tmp_path):
    small_table(client, "norich_t", dim=4)
    client.update("norich_t", np.arange(100), np.ones((100, 4), np.float32))
    hidden = tmp_path / "hide"
    (hidden / "rich").mkdir(parents=True)
    (hidden / "rich" / "__init__.py").write_text("raise ImportError('rich is not installed')\n")
    code, drawn = on_a_terminal("--address", server.address, "export", "norich_t", str(tmp_path / "out"),
                                env={"PYTHONPATH": os.pathsep.join([str(hidden), *sys.path])})
    assert code == 0
    assert "\x1b[" not in drawn and drawn.count("in all") == 1 and "export norich_t: 100 rows" in drawn


def test_restore_reports_elapsed_time_and_result(server, client):
    small_table(client, "restore_t", dim=4)
    assert at(server, "snapshot", "create", "restore-1").returncode == 0
    restored = at(server, "snapshot", "restore", "restore-1")
    assert restored.returncode == 0 and restored.stdout.startswith("restored snapshot restore-1 in ")
    assert "\r" not in restored.stderr


def on_a_terminal(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run `kvstore ARGS` with stderr on a pseudo-terminal, reading it as it is drawn (a full
    terminal buffer would block the command); its exit code and everything drawn."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    environ.update(env)
    controller, terminal = pty.openpty()
    drawn = bytearray()
    try:
        process = subprocess.Popen([sys.executable, "-m", "kvstore_client", *args], stdout=subprocess.DEVNULL,
                                   stderr=terminal, env=environ)
        os.close(terminal)
        while True:
            ready, _, _ = select.select([controller], [], [], 1.0)
            try:
                block = os.read(controller, 65536) if ready else b""
            except OSError:            # EIO: the command exited and closed the terminal
                block = b""
            drawn += block
            if not block and process.poll() is not None:
                break
        return process.wait(60), drawn.decode(errors="replace")
    finally:
        os.close(controller)
