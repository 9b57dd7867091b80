"""The metrics page is loopback-only unless told otherwise, and can demand the bearer token and TLS."""
from __future__ import annotations

import ssl
import subprocess
import urllib.error
import urllib.request

import pytest

from .conftest import free_port, needs_promtool, private_token_file

pytest.importorskip("cryptography.x509", reason="the cryptography package makes the test certificates")
from .test_tls import Authority  # noqa: E402

TOKEN = "metrics-token-of-the-operator"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port`, read from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:     # 0A = LISTEN
                found.add(address)
    return found


def _scrape(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    return private_token_file(tmp_path_factory.mktemp("metrics-auth"), TOKEN)


def test_metrics_bind_loopback_even_when_grpc_binds_every_address(start_server, token_file):
    port = free_port()
    start_server("--host", "0.0.0.0", "--auth-token-file", str(token_file), metrics_port=port)
    addresses = _listening_addresses(port)
    assert addresses == {"0100007F"}, addresses          # 127.0.0.1, little-endian hex
    status, body = _scrape(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and "kvstore_" in body


@pytest.fixture(scope="module")
def guarded(start_server, token_file, tmp_path_factory):
    authority = Authority(tmp_path_factory.mktemp("metrics-pki"), "metrics-ca")
    cert, key = authority.issue("server", server=True)
    port = free_port()
    start_server("--auth-token-file", str(token_file), "--tls-cert", str(cert), "--tls-key", str(key),
                 "--metrics-auth", "true", "--metrics-tls", "true", metrics_port=port)
    context = ssl.create_default_context(cafile=str(authority.pem))
    return f"https://127.0.0.1:{port}/metrics", context


@pytest.mark.parametrize("token", [None, "wrong", TOKEN[:-1]], ids=["none", "wrong", "prefix"])
def test_protected_metrics_refuse_scrapes_without_the_token(guarded, token):
    url, context = guarded
    status, body = _scrape(url, token, context)
    assert status == 401 and "kvstore_" not in body


def test_protected_metrics_refuse_plain_http(guarded):
    url, _ = guarded
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _scrape(url.replace("https://", "http://"))


@needs_promtool
def test_authorized_scrape_over_tls_is_valid_exposition(guarded):
    url, context = guarded
    status, body = _scrape(url, TOKEN, context)
    assert status == 200 and "kvstore_rpc" in body
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("flags, key", [
    (["--metrics-auth", "true"], "metrics_auth"),
    (["--metrics-tls", "true"], "metrics_tls"),
])
def test_metrics_protection_without_its_credentials_is_a_config_error(tmp_path, flags, key):
    from .conftest import run_cli

    result = run_cli("kvstore_server", "--data-dir", str(tmp_path / "data"), "--port", "0", *flags)
    assert result.returncode == 2 and key in result.stderr, result.stderr
