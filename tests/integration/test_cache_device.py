"""The cache device through the service: on the wire, as a server default, and on a server without the GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from gpu.conftest import gpu_usable
from kvstore_client import FailedPreconditionError, InvalidArgumentError, KVStoreClient

from kvstore import CacheConfig, Store, TableConfig

from .conftest import small_table

no_gpu = pytest.mark.skipif(gpu_usable(), reason="a CUDA device is present: these check the GPU-absent path")


def kvstore(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> args` with no KVSTORE_* variables but `env`'s."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60,
                          env={**environ, **(env or {})})


@no_gpu
def test_gpu_table_on_a_server_without_cuda_is_failed_precondition_and_the_server_keeps_serving(client):
    small_table(client, "kept", dim=4)
    client.update("kept", [1, 2], np.ones((2, 4), np.float32))
    for device in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(FailedPreconditionError) as refused:
            client.create_table("g", 16, cache={"device": device, "rows": 256, "ways": 32})
        assert refused.value.message.startswith("cache.device") and repr(device) in refused.value.message
        assert "CuPy" in refused.value.message or "CUDA device" in refused.value.message   # what is missing
    assert "g" not in client.list_tables()
    np.testing.assert_array_equal(client.lookup("kept", [1, 2], on_miss="error"), np.ones((2, 4), np.float32))
    small_table(client, "g", dim=16)                    # the name was never taken


def test_a_table_without_a_device_gets_the_server_default_and_describe_shows_it(server, client):
    small_table(client, "plain", dim=4)
    assert client.describe_table("plain")["cache"]["device"] == "cpu"
    described = json.loads(kvstore("kvstore_client", "--address", server.address, "describe", "plain").stdout)
    assert described["cache"]["device"] == "cpu" and "host_rows" not in described["cache"]    # no host tier
    chosen = small_table(client, "chosen", dim=4, cache={"rows": 64, "ways": 32, "device": "cpu"})
    assert chosen["cache"]["device"] == "cpu"


@pytest.mark.parametrize("cache, field", [
    ({"host_rows": 64}, "cache.host_rows"),                                 # a host tier needs a GPU tier above it
    ({"device": "cuda", "host_rows": 33}, "cache.host_rows"),              # not a multiple of its 32 ways
    ({"device": "cuda", "host_rows": 64, "host_policy": "fifo"}, "cache.host_policy"),
    ({"device": "tpu"}, "cache.device"),
    ({"device": "cuda:x"}, "cache.device"),
])
def test_bad_device_or_host_tier_is_invalid_argument_naming_the_field(client, cache, field):
    with pytest.raises(InvalidArgumentError) as refused:
        client.create_table("bad_cache", 8, cache={"rows": 64, "ways": 32, **cache})
    assert refused.value.message.startswith(field)
    assert "bad_cache" not in client.list_tables()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=no_gpu), "cuda:99"])
@pytest.mark.parametrize("spelling", ["flag", "env"])
def test_a_server_told_to_use_a_missing_device_refuses_to_start_in_one_line(tmp_path, device, spelling):
    data_dir = tmp_path / "data"
    args = ["kvstore_server", "--data-dir", str(data_dir), "--port", "0"]
    result = (kvstore(*args, "--cache-device", device) if spelling == "flag"
              else kvstore(*args, env={"KVSTORE_CACHE_DEVICE": device}))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kvstore-server: cache_device: {device!r} is not available (")
    assert "Traceback" not in result.stderr and not data_dir.exists()


def test_a_bad_cache_device_is_a_usage_error_and_print_config_shows_the_setting(tmp_path):
    bad = kvstore("kvstore_server", "--data-dir", str(tmp_path / "data"), "--cache-device", "gpu")
    assert bad.returncode == 2 and "cache_device" in bad.stderr and "Traceback" not in bad.stderr
    shown = kvstore("kvstore_server", "--print-config", env={"KVSTORE_CACHE_DEVICE": "cuda:1"})
    assert shown.returncode == 0 and 'cache_device: "cuda:1"  # KVSTORE_CACHE_DEVICE' in shown.stdout


@no_gpu
def test_a_gpu_table_restarted_on_a_machine_without_the_gpu_serves_from_host_memory(start_server, tmp_path):
    """The data directory of a GPU host, moved to one without: the table opens with its host tier's slots
    (cache.device 'cpu'), one warning names it, no row is lost, and the stored config keeps the GPU."""
    data_dir = tmp_path / "data"
    stored = TableConfig(name="g", dim=4, cache=CacheConfig(rows=256, ways=32, device="cuda", host_rows=1024))
    with Store(str(data_dir)) as store:                # as written on the GPU host: rows in RocksDB
        store.create_table(TableConfig(name="g", dim=4, cache=CacheConfig(rows=256, ways=32)))
        store.update("g", np.arange(500), np.repeat(np.arange(500, dtype=np.float32)[:, None], 4, axis=1))
        store.rocks.save_config("g", json.dumps(stored.to_dict()).encode(), store.table("g").family)
    server = start_server(data_dir=data_dir)
    with KVStoreClient(server.address, timeout=30) as client:
        cache = client.describe_table("g")["cache"]
        assert (cache["device"], cache["rows"], cache["host_rows"]) == ("cpu", 1024, 0)
        np.testing.assert_array_equal(client.lookup("g", np.arange(500), on_miss="error")[:, 0], np.arange(500))
        client.update("g", [3], np.full((1, 4), -3, np.float32))
    warnings = [line for line in server.log.read_text().splitlines() if "is not available" in line]
    assert len(warnings) == 1 and "'g'" in warnings[0] and "cache.device 'cuda'" in warnings[0]
    server.restart()                                   # still the GPU's table: the warning comes again
    with KVStoreClient(server.address, timeout=30) as client:
        assert client.lookup("g", [3, 4], on_miss="error").tolist() == [[-3.0] * 4, [4.0] * 4]
    assert sum("is not available" in line for line in server.log.read_text().splitlines()) == 2
