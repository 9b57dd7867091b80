"""Configuration precedence (flags > KVSTORE_* > file > defaults), --print-config, JSON logs with request ids."""
from __future__ import annotations

import json
import re

import grpc
import pytest
import yaml
from kvstore_proto.v1 import kvstore_pb2 as pb
from kvstore_proto.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore_server.config import ServerConfig

from .conftest import run_cli, wait_until


def _printed(result) -> tuple[dict, dict[str, str]]:
    """The printed config, and the source comment of each key (nested keys dotted)."""
    assert result.returncode == 0, result.stderr
    sources, section = {}, ""
    for line in result.stdout.splitlines():
        match = re.match(r"^( *)(\w+):(?: .*#\s*(.+))?$", line)
        assert match, f"not a config line: {line!r}"
        indent, key, source = match.groups()
        if source is None:
            section = key
        else:
            sources[f"{section}.{key}" if indent else key] = source.strip()
    return yaml.safe_load(result.stdout), sources


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("port: 7000\nmetrics_port: 9100\nmax_workers: 3\nhost: 10.0.0.1\n"
                    "rocksdb:\n  durability: none\n  read_threads: 3\n")
    return path


def test_print_config_shows_flags_over_env_over_file_over_defaults(config_file, tmp_path):
    data_dir = tmp_path / "data"
    env = {"KVSTORE_PORT": "7001", "KVSTORE_MAX_WORKERS": "5", "KVSTORE_ROCKSDB_READ_THREADS": "2"}
    result = run_cli("kvstore_server", "--config", str(config_file), "--port", "7002", "--data-dir", str(data_dir),
                     "--print-config", env=env)
    printed, sources = _printed(result)
    assert printed["port"] == 7002 and sources["port"] == "--port"                          # flag over env
    assert printed["max_workers"] == 5 and sources["max_workers"] == "KVSTORE_MAX_WORKERS"  # env over file
    assert printed["metrics_port"] == 9100 and sources["metrics_port"] == f"file {config_file}"
    assert printed["rocksdb"]["read_threads"] == 2 and sources["rocksdb.read_threads"] == "KVSTORE_ROCKSDB_READ_THREADS"
    assert printed["rocksdb"]["durability"] == "none" and sources["rocksdb.durability"] == f"file {config_file}"
    assert printed["grace_seconds"] == ServerConfig().grace_seconds and sources["grace_seconds"] == "default"
    assert ServerConfig.from_dict(printed).port == 7002        # the output is itself a valid config file
    assert not data_dir.exists(), "--print-config must not open the store"


def test_config_file_can_be_named_by_the_environment(config_file):
    printed, sources = _printed(run_cli("kvstore_server", "--print-config", env={"KVSTORE_CONFIG": str(config_file)}))
    assert printed["host"] == "10.0.0.1" and sources["host"] == f"file {config_file}"


def test_defaults_bind_loopback(tmp_path):
    printed, _ = _printed(run_cli("kvstore_server", "--print-config"))
    assert printed["host"] == "127.0.0.1" and printed["auth_token_file"] == "" and printed["tls_cert"] == ""


@pytest.mark.parametrize("source, name", [
    ({"file": "max_wrokers: 3\n"}, "max_wrokers"),
    ({"file": "rocksdb:\n  durabilty: wal\n"}, "rocksdb.durabilty"),
    ({"env": {"KVSTORE_MAX_WROKERS": "3"}}, "KVSTORE_MAX_WROKERS"),
], ids=["file", "nested", "env"])
def test_unknown_config_key_is_an_error_naming_it(tmp_path, source, name):
    args = []
    if "file" in source:
        (tmp_path / "server.yaml").write_text(source["file"])
        args = ["--config", str(tmp_path / "server.yaml")]
    result = run_cli("kvstore_server", *args, "--print-config", env=source.get("env"))
    assert result.returncode == 2 and name in result.stderr and result.stdout == ""


@pytest.mark.parametrize("args, env, name", [
    (["--port", "fifty"], None, "--port"),
    ([], {"KVSTORE_GRACE_SECONDS": "soon"}, "KVSTORE_GRACE_SECONDS"),
    (["--log-format", "xml"], None, "log_format"),
    (["--inline-lookup-bytes", "-1"], None, "inline_lookup_bytes"),
    (["--host-threads", "65"], None, "host_threads"),
    ([], {"KVSTORE_HOST_THREADS": "-1"}, "host_threads"),
])
def test_badly_typed_values_name_their_source(args, env, name):
    result = run_cli("kvstore_server", *args, "--print-config", env=env)
    assert result.returncode == 2 and name in result.stderr


# --- structured logs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def json_server(start_server):
    return start_server("--log-format", "json", "--log-level", "debug")


def _records(server) -> list[dict]:
    """The server's JSON log records (gRPC's C core may write its own plain lines to stderr too)."""
    return [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]


def test_json_logs_carry_the_callers_request_id(json_server):
    with grpc.insecure_channel(json_server.address) as channel:
        stub = pb_grpc.EmbeddingStoreStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.DescribeTable(pb.DescribeTableRequest(table="absent"), timeout=10,
                               metadata=(("x-request-id", "trace-4711"),))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert ("x-request-id", "trace-4711") in error.value.initial_metadata()

    def logged():
        return [r for r in _records(json_server) if r.get("request_id") == "trace-4711"]

    assert wait_until(lambda: logged())
    (record,) = logged()
    assert record["method"] == "/kvstore.v1.EmbeddingStore/DescribeTable" and record["code"] == "NOT_FOUND"
    assert record["level"] == "info" and record["duration_ms"] >= 0


def test_calls_without_a_request_id_get_a_fresh_one_per_call(json_server):
    ids = []
    with grpc.insecure_channel(json_server.address) as channel:
        stub = pb_grpc.EmbeddingStoreStub(channel)
        for given in (None, "has spaces and is not valid"):
            metadata = (("x-request-id", given),) if given else None
            _, call = stub.ListTables.with_call(pb.ListTablesRequest(), timeout=10, metadata=metadata)
            ids.append(dict(call.initial_metadata())["x-request-id"])
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]
    assert wait_until(lambda: {r.get("request_id") for r in _records(json_server)} >= set(ids))
    assert all(isinstance(r["message"], str) and r["time"].endswith("Z") for r in _records(json_server))


def test_host_threads_bounds_how_far_a_large_batch_is_split(tmp_path, monkeypatch):
    from kvstore_server.server import KVStoreServer

    from kvstore import row_threads

    monkeypatch.setattr(row_threads, "THREADS", row_threads.THREADS)      # put back after the test
    KVStoreServer(ServerConfig(data_dir=str(tmp_path), host_threads=3))
    assert (row_threads.THREADS, row_threads._parts(1 << 20)) == (3, 2)    # a power of two: 2 parts
    KVStoreServer(ServerConfig(data_dir=str(tmp_path), host_threads=1))
    assert row_threads._parts(1 << 20) == 1
    KVStoreServer(ServerConfig(data_dir=str(tmp_path)))
    assert row_threads.THREADS == row_threads.default_threads()
