"""TLS and mutual TLS end to end, with certificates made here for 127.0.0.1."""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from kvstore_client import KVStoreClient, UnauthenticatedError, UnavailableError

from .conftest import run_cli

x509 = pytest.importorskip("cryptography.x509", reason="the cryptography package makes the test certificates")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

TIMEOUT = 10
TOKEN = "both-factors-of-the-operator"


class Authority:
    """A throw-away CA that issues server and client certificates as PEM files."""

    def __init__(self, directory: Path, name: str):
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (self._builder(subject, subject, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = self._write(f"{name}.crt", self.cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject, issuer, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def _write(self, name: str, content: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(content)
        return path

    def issue(self, name: str, server: bool) -> tuple[Path, Path]:
        """(certificate, key) files; server certificates name 127.0.0.1 and localhost."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (self._builder(subject, self.cert.subject, key.public_key())
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if server:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return (self._write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{name}.key", key_pem))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, stranger = (Authority(directory, n) for n in ("server-ca", "client-ca", "stranger-ca"))
    return {
        "server_ca": server_ca.pem, "client_ca": client_ca.pem,
        "server": server_ca.issue("server", server=True),
        "client": client_ca.issue("client", server=False),
        "stranger": stranger.issue("stranger", server=False),
        "stranger_ca": stranger.pem,
    }


@pytest.fixture(scope="module")
def tls_server(start_server, pki):
    cert, key = pki["server"]
    return start_server("--tls-cert", str(cert), "--tls-key", str(key))


@pytest.fixture(scope="module")
def mtls_server(start_server, pki, tmp_path_factory):
    cert, key = pki["server"]
    token = tmp_path_factory.mktemp("mtls") / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    return start_server("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(pki["client_ca"]),
                        "--auth-token-file", str(token))


def _client(server, pki, ca="server_ca", cert=None, **kwargs) -> KVStoreClient:
    chain = key = None
    if cert:
        chain, key = (p.read_bytes() for p in pki[cert])
    return KVStoreClient(server.address, timeout=TIMEOUT, root_certificates=pki[ca].read_bytes(),
                         certificate_chain=chain, private_key=key, **kwargs)


def test_tls_client_trusting_the_server_ca_is_served(tls_server, pki):
    with _client(tls_server, pki) as client:
        client.create_table("secret_rows", 4)
        assert client.list_tables() == ["secret_rows"]
        assert client.health() == "SERVING"


def test_tls_server_refuses_plaintext_and_untrusted_clients(tls_server, pki):
    with KVStoreClient(tls_server.address, timeout=TIMEOUT) as plaintext, pytest.raises(UnavailableError):
        plaintext.list_tables()
    with _client(tls_server, pki, ca="stranger_ca") as wrong_root, pytest.raises(UnavailableError):
        wrong_root.list_tables()


def test_mutual_tls_serves_a_client_certificate_of_the_client_ca(mtls_server, pki):
    with _client(mtls_server, pki, cert="client", token=TOKEN) as client:
        client.create_table("mutual", 4)
        assert client.list_tables() == ["mutual"]
    with _client(mtls_server, pki, cert="client") as no_token, pytest.raises(UnauthenticatedError):
        no_token.list_tables()


@pytest.mark.parametrize("cert", [None, "stranger"], ids=["no-client-cert", "cert-of-another-ca"])
def test_mutual_tls_refuses_clients_without_a_trusted_certificate(mtls_server, pki, cert):
    with _client(mtls_server, pki, cert=cert, token=TOKEN) as client, pytest.raises(UnavailableError):
        client.list_tables()
    with _client(mtls_server, pki, cert=cert) as client, pytest.raises(UnavailableError):
        client.health()                         # the handshake fails before any RPC, health included


def test_operator_cli_speaks_mutual_tls(mtls_server, pki, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    cert, key = pki["client"]
    base = ["--address", mtls_server.address, "--timeout", str(TIMEOUT), "--tls-ca", str(pki["server_ca"]),
            "--tls-cert", str(cert), "--tls-key", str(key)]
    health = run_cli("kvstore_client", *base, "health")
    assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stderr
    tables = run_cli("kvstore_client", *base, "--token-file", str(token), "tables")
    assert tables.returncode == 0, tables.stderr
    refused = run_cli("kvstore_client", "--address", mtls_server.address, "--timeout", str(TIMEOUT),
                      "--tls-ca", str(pki["server_ca"]), "health")
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr


@pytest.mark.parametrize("flags, key", [
    (["--tls-cert", "{cert}"], "tls_cert"),
    (["--tls-cert", "{cert}", "--tls-key", "{missing}"], "tls_key"),
    (["--tls-client-ca", "{ca}"], "tls_client_ca"),
])
def test_incomplete_tls_settings_are_errors_naming_the_key(pki, tmp_path, flags, key):
    cert, _ = pki["server"]
    values = {"cert": cert, "missing": tmp_path / "absent.key", "ca": pki["client_ca"]}
    args = [flag.format(**values) for flag in flags]
    result = run_cli("kvstore_server", "--data-dir", str(tmp_path / "data"), "--port", "0", *args)
    assert result.returncode == 2 and key in result.stderr, result.stderr
    assert not (tmp_path / "data").exists()


def test_renewed_server_certificate_is_served_without_a_restart(start_server, tmp_path):
    old_ca, new_ca = Authority(tmp_path, "old-ca"), Authority(tmp_path, "new-ca")
    cert, key = old_ca.issue("server", server=True)
    server = start_server("--tls-cert", str(cert), "--tls-key", str(key))
    with KVStoreClient(server.address, timeout=TIMEOUT, root_certificates=old_ca.pem.read_bytes()) as client:
        assert client.health() == "SERVING"
    renewed_cert, renewed_key = new_ca.issue("renewed", server=True)
    key.write_bytes(renewed_key.read_bytes())
    cert.write_bytes(renewed_cert.read_bytes())
    with KVStoreClient(server.address, timeout=TIMEOUT, root_certificates=new_ca.pem.read_bytes()) as client:
        assert client.health() == "SERVING"
    with KVStoreClient(server.address, timeout=TIMEOUT, root_certificates=old_ca.pem.read_bytes()) as client, \
            pytest.raises(UnavailableError):
        client.health()
