"""Safe defaults, said out loud: private secret files, TLS files checked at start, a private data
directory, and a warning whenever the server is reachable without a token or the token without TLS."""
from __future__ import annotations

import datetime
import os
import stat

import pytest

from .conftest import run_cli

x509 = pytest.importorskip("cryptography.x509", reason="the cryptography package makes the test certificates")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

TOKEN = "a-token-long-enough-to-guess-never"


def _server(tmp_path, *flags):
    """Start `kvstore-server` with `flags`; it must refuse before binding, so it returns at once."""
    return run_cli("kvstore_server", "--data-dir", str(tmp_path / "data"), "--port", "0", *flags)


def _token_file(tmp_path, content=TOKEN, mode=0o600, name="token"):
    path = tmp_path / name
    path.write_text(content + "\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o666, 0o604, 0o620], ids=oct)
def test_token_file_readable_by_others_is_refused(tmp_path, mode):
    result = _server(tmp_path, "--auth-token-file", str(_token_file(tmp_path, mode=mode)))
    assert result.returncode == 2, result.stderr
    assert "auth_token_file" in result.stderr and "chmod 600" in result.stderr
    assert TOKEN not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists()


def test_short_token_is_refused(tmp_path):
    result = _server(tmp_path, "--auth-token-file", str(_token_file(tmp_path, content="x")))
    assert result.returncode == 2 and "at least 16" in result.stderr, result.stderr


def test_token_symlink_leading_out_of_its_directory_is_refused(tmp_path):
    secret = _token_file(tmp_path)
    (tmp_path / "etc").mkdir()
    link = tmp_path / "etc" / "token"
    link.symlink_to(secret)
    result = _server(tmp_path, "--auth-token-file", str(link))
    assert result.returncode == 2 and "symbolic link" in result.stderr, result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_token_file_of_another_user_is_refused(tmp_path):
    secret = _token_file(tmp_path)
    os.chown(secret, 54321, 54321)
    result = _server(tmp_path, "--auth-token-file", str(secret))
    assert result.returncode == 2 and "another user" in result.stderr, result.stderr


def test_kubernetes_secret_layout_is_accepted(tmp_path):
    """A Secret volume: `token -> ..data/token`, `..data -> ..2026_11_30/`, the file 0400."""
    from kvstore_server.security import read_token

    versioned = tmp_path / "..2026_11_30"
    versioned.mkdir()
    _token_file(versioned, mode=0o400)
    (tmp_path / "..data").symlink_to(versioned.name)
    (tmp_path / "token").symlink_to("..data/token")
    assert read_token(str(tmp_path / "token")) == TOKEN


class _Certificates:
    def __init__(self, directory):
        self.directory = directory

    def write(self, name, not_before, not_after, key=None):
        """(certificate, key) PEM files of a self-signed certificate valid in [not_before, not_after]."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now + not_before).not_valid_after(now + not_after)
                .sign(key, hashes.SHA256()))
        cert_path, key_path = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path


DAY = datetime.timedelta(days=1)


@pytest.mark.parametrize("case, expected", [
    ("expired", "tls_cert: the certificate expired on"),
    ("not_yet_valid", "tls_cert: the certificate is not valid before"),
    ("foreign_key", "is not the key of the certificate"),
    ("cert_not_pem", "tls_cert:"),
    ("key_not_pem", "tls_key:"),
])
def test_tls_misconfiguration_refuses_to_start_naming_it(tmp_path, case, expected):
    certificates = _Certificates(tmp_path)
    cert, key = certificates.write("good", -DAY, DAY)
    if case == "expired":
        cert, key = certificates.write("old", -2 * DAY, -DAY)
    elif case == "not_yet_valid":
        cert, key = certificates.write("future", DAY, 2 * DAY)
    elif case == "foreign_key":
        _, key = certificates.write("other", -DAY, DAY)
    elif case == "cert_not_pem":
        cert.write_text("not a certificate")
    elif case == "key_not_pem":
        key.write_text("not a key")
    result = _server(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "cannot bind" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "data").exists()


def test_reachable_server_without_token_warns_and_data_dir_is_private(start_server, tmp_path):
    server = start_server("--host", "0.0.0.0", data_dir=tmp_path / "open")
    log = server.log.read_text()
    assert "auth_token_file is not set" in log
    data = tmp_path / "open"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = [p for p in data.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in files), \
        [(p.name, oct(p.stat().st_mode)) for p in files if p.stat().st_mode & 0o077]


def test_token_without_tls_on_a_reachable_address_warns(start_server, tmp_path):
    token = _token_file(tmp_path)
    server = start_server("--host", "0.0.0.0", "--auth-token-file", str(token), data_dir=tmp_path / "clear")
    log = server.log.read_text()
    assert "travels in clear" in log and "auth_token_file is not set" not in log
    assert TOKEN not in log


def test_loopback_server_does_not_warn(start_server, tmp_path):
    server = start_server(data_dir=tmp_path / "quiet")
    assert "reachable from other machines" not in server.log.read_text()


def test_client_refuses_to_send_a_token_in_clear_to_another_machine():
    from kvstore_client import InvalidArgumentError, KVStoreClient

    with pytest.raises(InvalidArgumentError, match="in clear"):
        KVStoreClient("10.1.2.3:50051", token=TOKEN)
    for local in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051"):
        KVStoreClient(local, token=TOKEN).close()                     # this machine: allowed
    KVStoreClient("10.1.2.3:50051", token=TOKEN, insecure=True).close()   # said out loud: allowed
    KVStoreClient("10.1.2.3:50051", token=TOKEN, tls=True).close()       # over TLS: allowed


def test_cli_refuses_a_clear_text_token_to_a_remote_address_unless_insecure(tmp_path):
    token = _token_file(tmp_path)
    refused = run_cli("kvstore_client", "--address", "10.1.2.3:50051", "--timeout", "1", "--token-file", str(token),
                      "tables")
    assert refused.returncode == 1 and "in clear" in refused.stderr and "--insecure" in refused.stderr
    assert TOKEN not in refused.stderr
    tried = run_cli("kvstore_client", "--address", "10.1.2.3:50051", "--timeout", "1", "--token-file", str(token),
                    "--insecure", "tables")
    assert "in clear" not in tried.stderr                                  # it tried (and found no server)
