"""Bearer-token auth: calls without the exact token are UNAUTHENTICATED and change nothing; health stays open."""
from __future__ import annotations

import json

import numpy as np
import pytest
from kvstore_client import KVStoreClient, UnauthenticatedError

from .conftest import free_port, run_cli, scrape, value

TOKEN = "k3y-0f-the-0perator"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def server(start_server, token_file):
    return start_server("--auth-token-file", str(token_file), metrics_port=free_port())


@pytest.fixture(scope="module")
def admin(server):
    with KVStoreClient(server.address, token=TOKEN) as opened:
        opened.create_table("guarded", 4)
        opened.update("guarded", [1, 2], np.ones((2, 4), np.float32))
        yield opened


def _attempts(client: KVStoreClient):
    """Every kind of call: reads, writes, table changes."""
    yield lambda: client.list_tables()
    yield lambda: client.describe_table("guarded")
    yield lambda: client.stats("guarded")
    yield lambda: client.lookup("guarded", [1, 3])
    yield lambda: client.update("guarded", [1, 2], np.full((2, 4), 7, np.float32))
    yield lambda: client.delete("guarded", [1, 2])
    yield lambda: client.create_table("intruder", 4)
    yield lambda: client.drop_table("guarded")


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN[:-1], TOKEN + "x", TOKEN.upper()],
                         ids=["none", "empty", "wrong", "prefix", "longer", "case"])
def test_calls_without_the_exact_token_are_unauthenticated_and_change_nothing(server, admin, token):
    with KVStoreClient(server.address, token=token, timeout=10) as client:
        for attempt in _attempts(client):
            with pytest.raises(UnauthenticatedError) as error:
                attempt()
            assert "authorization" in error.value.message
    assert admin.list_tables() == ["guarded"]
    np.testing.assert_array_equal(admin.lookup("guarded", [1, 2, 3], on_miss="zeros"),
                                  np.array([[1] * 4, [1] * 4, [0] * 4], np.float32))


def test_health_answers_without_a_token(server, admin):
    with KVStoreClient(server.address, timeout=10) as anonymous:
        assert anonymous.health() == "SERVING"
        assert anonymous.health("kvstore.v1.EmbeddingStore") == "SERVING"
    result = run_cli("kvstore_client", "--address", server.address, "health")
    assert result.returncode == 0 and result.stdout.strip() == "SERVING"


def test_refused_calls_are_counted_by_method(server, admin):
    before = value(scrape(server), "kvstore_auth_failures_total", method="ListTables")
    with KVStoreClient(server.address, token="wrong", timeout=10) as client, pytest.raises(UnauthenticatedError):
        client.list_tables()
    assert value(scrape(server), "kvstore_auth_failures_total", method="ListTables") == before + 1


def test_operator_cli_sends_the_token_from_a_file(server, admin, token_file, tmp_path):
    listed = run_cli("kvstore_client", "--address", server.address, "--token-file", str(token_file), "tables")
    assert listed.returncode == 0, listed.stderr
    assert [row.split()[0] for row in listed.stdout.splitlines()[1:]] == ["guarded"]     # under a header
    auth = ["--address", server.address, "--token-file", str(token_file)]
    described = run_cli("kvstore_client", *auth, "describe", "guarded")
    assert described.returncode == 0 and json.loads(described.stdout)["dim"] == 4
    stats = run_cli("kvstore_client", *auth, "stats", "guarded", "--json")
    assert stats.returncode == 0 and json.loads(stats.stdout)["rows_updated"] >= 2
    absent = run_cli("kvstore_client", *auth, "stats", "absent")
    assert absent.returncode == 1 and "NOT_FOUND" in absent.stderr
    refused = run_cli("kvstore_client", "--address", server.address, "tables")
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    missing = run_cli("kvstore_client", "--address", server.address, "--token-file", str(tmp_path / "nope"),
                      "tables")
    assert missing.returncode == 1 and "--token-file" in missing.stderr


def test_empty_token_file_is_a_config_error_naming_the_key(tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    empty.chmod(0o600)
    result = run_cli("kvstore_server", "--data-dir", str(tmp_path / "data"), "--port", "0",
                     "--auth-token-file", str(empty))
    assert result.returncode == 2 and "auth_token_file" in result.stderr
    assert "listening" not in result.stdout
