"""The service around the rows: table management, health, reflection, metrics."""
from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from kvstore.dtypes import weight_dtype

from .conftest import small_table


def test_create_returns_the_full_config_with_defaults(client):
    config = client.create_table("defaults", 16)
    assert config["dtype"] == "float32" and config["dim"] == 16
    assert config["optimizer"]["name"] == "sgd" and config["cache"]["write"] == "write_back"
    assert client.describe_table("defaults") == config


def test_create_keeps_what_was_asked(client):
    config = client.create_table("custom", 4, dtype="float16", optimizer={"name": "adagrad", "lr": 0.5},
                                 initializer={"kind": "zeros"}, cache={"rows": 64, "ways": 4, "policy": "lfu",
                                                                      "write": "write_through"})
    assert config["dtype"] == "float16" and config["optimizer"]["lr"] == 0.5
    assert config["cache"] == {"rows": 64, "ways": 4, "policy": "lfu", "write": "write_through", "flush_seconds": 1.0,
                               "device": "cpu", "host_rows": 0, "host_policy": ""}      # the server's default device
    np.testing.assert_array_equal(client.lookup("custom", [1, 2], on_miss="init"), np.zeros((2, 4)))


def test_list_and_drop_tables(client):
    small_table(client, "dropme")
    client.update("dropme", [1], np.ones((1, 8), np.float32))
    assert "dropme" in client.list_tables()
    client.drop_table("dropme")
    assert "dropme" not in client.list_tables()
    small_table(client, "dropme")        # the name is free again, and the old rows are gone
    np.testing.assert_array_equal(client.lookup("dropme", [1], on_miss="zeros"), np.zeros((1, 8)))


def test_health_is_serving(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kvstore.v1.EmbeddingStore"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server):
    with grpc.insecure_channel(server.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "kvstore.v1.EmbeddingStore" in services and "grpc.health.v1.Health" in services
        methods = {m.name for m in ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol(
            "kvstore.v1.EmbeddingStore").service[0].method}
    assert {"Lookup", "Update", "Delete", "CreateTable"} <= methods


def scrape(server) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_metrics_expose_rpc_latency_and_table_counters(server, client):
    small_table(client, "metered")
    client.update("metered", [1, 2, 3], np.ones((3, 8), np.float32))
    client.lookup("metered", [1, 2])
    try:
        client.describe_table("not_there")
    except Exception:  # noqa: BLE001 - only its metric matters here
        pass
    text = scrape(server)
    assert 'kvstore_rpc_duration_seconds_count{code="OK",method="Lookup"}' in text
    assert 'kvstore_rpc_duration_seconds_count{code="NOT_FOUND",method="DescribeTable"}' in text
    assert 'kvstore_rows_updated_total{table="metered"} 3.0' in text
    assert 'kvstore_cache_rows{table="metered"}' in text


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_lookup_with_misses_written_into_its_response_equals_the_encoded_one(client, dtype):
    """Weights asked for alone are written into the response message in the store thread; with
    state the response is encoded after the lookup: the same rows either way."""
    table = f"into_{dtype}"
    client.create_table(table, 8, dtype=dtype)
    client.update(table, np.arange(10), np.full((10, 8), 0.5, weight_dtype(dtype)))
    ids = np.array([3, 100, 5, 100, 11])                      # cached, missing (twice), cached, missing
    weights = client.lookup(table, ids, on_miss="init")
    encoded, _ = client.lookup(table, ids, on_miss="init", with_state=True)
    np.testing.assert_array_equal(weights, encoded)
    assert (weights[[0, 2]] == 0.5).all() and not (weights[[1, 4]] == 0.5).all()
