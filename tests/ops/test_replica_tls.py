"""A replica reaches its primary over TLS or mutual TLS (`replication.tls_ca`, `replication.tls_cert`,
`replication.tls_key`), and refuses to start when it would send the token in clear to another machine."""
from __future__ import annotations

import numpy as np
import pytest
from kvstore_client import KVStoreClient

from .conftest import free_port, private_token_file, run_cli, wait_until
from .test_tls import TOKEN, pki  # noqa: F401 - the fixture

DEADLINE = 120.0


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    return private_token_file(tmp_path_factory.mktemp("replica-auth"), TOKEN)


def _primary_rows(server, pki, name: str) -> np.ndarray:  # noqa: F811
    """A table with rows on a TLS primary; the rows."""
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    chain, key = (p.read_bytes() for p in pki["client"])
    with KVStoreClient(server.address, timeout=30, token=TOKEN, root_certificates=pki["server_ca"].read_bytes(),
                       certificate_chain=chain, private_key=key) as client:
        client.create_table(name, 4)
        client.update(name, [1, 2, 3], rows)
    return rows


def _follows(replica, name: str, rows: np.ndarray) -> bool:
    with KVStoreClient(replica.address, timeout=30, token=TOKEN) as client:

        def copied() -> bool:
            try:
                return np.array_equal(client.lookup(name, [1, 2, 3], on_miss="error"), rows)
            except Exception:           # not bootstrapped yet
                return False

        return wait_until(copied, DEADLINE)


def test_a_replica_follows_a_primary_with_mutual_tls_and_a_token(start_server, pki, token_file):  # noqa: F811
    cert, key = pki["server"]
    primary = start_server("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(pki["client_ca"]),
                           "--auth-token-file", str(token_file))
    rows = _primary_rows(primary, pki, "over_mtls")
    client_cert, client_key = pki["client"]
    replica = start_server("--replica-of", primary.address, "--auth-token-file", str(token_file),
                           "--replication-tls-ca", str(pki["server_ca"]), "--replication-tls-cert", str(client_cert),
                           "--replication-tls-key", str(client_key), "--replication-retry-seconds", "0.5")
    assert _follows(replica, "over_mtls", rows)


def test_a_replica_refuses_to_send_its_token_in_clear_to_another_machine(token_file):
    result = run_cli("kvstore_server", "--replica-of", "192.0.2.10:50051", "--auth-token-file", str(token_file),
                     "--port", str(free_port()), "--data-dir", str(token_file.parent / "refused"))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("kvstore-server: replication.tls_ca") and "in clear" in line
    assert TOKEN not in result.stderr


def test_a_replica_told_insecure_starts_against_a_plaintext_remote_primary(start_server, token_file):
    replica = start_server("--replica-of", "192.0.2.10:50051", "--auth-token-file", str(token_file),
                           "--replication-insecure", "true", "--replication-retry-seconds", "0.5")
    assert replica.alive()


def test_replica_tls_files_that_cannot_be_read_refuse_the_start(tmp_path):
    result = run_cli("kvstore_server", "--replica-of", "127.0.0.1:1", "--replication-tls-ca",
                     str(tmp_path / "missing.crt"), "--port", str(free_port()), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("kvstore-server: replication.tls_ca: cannot read")


def test_a_replica_client_certificate_needs_its_key_and_a_ca():
    result = run_cli("kvstore_server", "--replication-tls-cert", "client.crt", "--print-config")
    assert result.returncode == 2 and result.stderr.startswith("kvstore-server: replication.tls_cert")
